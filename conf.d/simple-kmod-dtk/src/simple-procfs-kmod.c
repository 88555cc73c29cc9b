// SPDX-License-Identifier: GPL-2.0
/*
 * simple_procfs_kmod: example driver shipped with kvcd. Creates
 * /proc/simple-procfs-kmod, which reads back a short fixed string.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

#define SIMPLE_PROCFS_NAME "simple-procfs-kmod"

static struct proc_dir_entry *simple_procfs_entry;

static int simple_procfs_show(struct seq_file *m, void *v)
{
	seq_puts(m, "simple-procfs-kmod number = 1\n");
	return 0;
}

static int __init simple_procfs_init(void)
{
	simple_procfs_entry = proc_create_single(SIMPLE_PROCFS_NAME, 0444, NULL,
						 simple_procfs_show);
	if (!simple_procfs_entry)
		return -ENOMEM;
	pr_info("simple-procfs-kmod: /proc/%s created\n", SIMPLE_PROCFS_NAME);
	return 0;
}

static void __exit simple_procfs_exit(void)
{
	proc_remove(simple_procfs_entry);
	pr_info("simple-procfs-kmod: /proc/%s removed\n", SIMPLE_PROCFS_NAME);
}

module_init(simple_procfs_init);
module_exit(simple_procfs_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION("1.0.0");
MODULE_DESCRIPTION("kvcd example driver: a read-only procfs entry");
