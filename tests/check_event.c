/* placeholder: being written */
#include "suites.h"
Suite *event_suite(void)
{
	return suite_create("event");
}
