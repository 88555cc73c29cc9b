// SPDX-License-Identifier: GPL-2.0
/*
 * Stand-in for Intel's out-of-tree ice driver, for kvcd's example build
 * test: a module named ice with the same version, parameter and firmware
 * declarations. It registers nothing and touches no hardware.
 */
#include <linux/module.h>
#include <linux/init.h>
#include "version.h"

static int debug = -1;
module_param(debug, int, 0644);
MODULE_PARM_DESC(debug, "netif level (0=none,...,16=all)");

static int __init ice_standin_init(void)
{
	pr_info("ice (kvcd stand-in) %s, debug=%d\n", DRV_VERSION, debug);
	return 0;
}

static void __exit ice_standin_exit(void)
{
}

module_init(ice_standin_init);
module_exit(ice_standin_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION(DRV_VERSION);
MODULE_DESCRIPTION("kvcd example build test: stand-in for Intel's ice driver");
MODULE_FIRMWARE("intel/ice/ddp/ice.pkg");
