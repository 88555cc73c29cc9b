// SPDX-License-Identifier: GPL-2.0
/*
 * kvcd_base: exports one symbol so that other fixture modules depend on it.
 */
#include <linux/module.h>
#include <linux/init.h>

int kvcd_base_value(void)
{
	return 42;
}
EXPORT_SYMBOL_GPL(kvcd_base_value);

static int __init kvcd_base_init(void)
{
	pr_info("kvcd_base: loaded\n");
	return 0;
}

static void __exit kvcd_base_exit(void)
{
	pr_info("kvcd_base: unloaded\n");
}

module_init(kvcd_base_init);
module_exit(kvcd_base_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvcd test fixture: exports kvcd_base_value()");
