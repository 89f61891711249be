/* placeholder: being written */
#include "suites.h"
Suite *codec_suite(void)
{
	return suite_create("codec");
}
