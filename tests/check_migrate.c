/* placeholder: being written */
#include "suites.h"
Suite *migrate_suite(void)
{
	return suite_create("migrate");
}
