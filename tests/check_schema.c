/* placeholder: being written */
#include "suites.h"
Suite *schema_suite(void)
{
	return suite_create("schema");
}
