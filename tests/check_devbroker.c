/* placeholder: being written */
#include "suites.h"
Suite *devbroker_suite(void)
{
	return suite_create("devbroker");
}
