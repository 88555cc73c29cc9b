// SPDX-License-Identifier: GPL-2.0
/*
 * simple_kmod: example driver shipped with kvcd. Prints a greeting.
 */
#include <linux/module.h>
#include <linux/init.h>

static int __init simple_kmod_init(void)
{
	pr_info("Hello world from simple-kmod\n");
	return 0;
}

static void __exit simple_kmod_exit(void)
{
	pr_info("Goodbye from simple-kmod\n");
}

module_init(simple_kmod_init);
module_exit(simple_kmod_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION("1.0.0");
MODULE_DESCRIPTION("kvcd example driver: hello world");
