// SPDX-License-Identifier: GPL-2.0
/*
 * kvcd_user: calls into kvcd_base, so depmod records kvcd_base as a dependency.
 */
#include <linux/module.h>
#include <linux/init.h>

int kvcd_base_value(void);

static int __init kvcd_user_init(void)
{
	pr_info("kvcd_user: base value is %d\n", kvcd_base_value());
	return 0;
}

static void __exit kvcd_user_exit(void)
{
	pr_info("kvcd_user: unloaded\n");
}

module_init(kvcd_user_init);
module_exit(kvcd_user_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION("1.2.0");
MODULE_DESCRIPTION("kvcd test fixture: depends on kvcd_base");
