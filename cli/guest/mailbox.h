/* Ferry demo guest: the control page shared with the host (mirrored in host/src/vmm/layout.rs). */
#ifndef FERRY_MAILBOX_H
#define FERRY_MAILBOX_H

typedef unsigned long u64;
typedef unsigned int u32;

#define MAILBOX_GPA 0x1000UL
#define MAILBOX_MAGIC 0x58424c4959525246UL /* "FRRYILBX" */
#define MAILBOX_ABI 1UL
#define STATUS_OFFSET 512UL
#define STATUS_STRIDE 128UL
#define MAX_VCPUS 16UL

#define PHASE_FILLING 1UL
#define PHASE_DIRTYING 2UL
#define PHASE_VERIFYING 3UL
#define PHASE_IDLE 4UL

/* Written by the host. */
struct mailbox {
	u64 magic;
	u64 abi;
	u64 seed;
	u64 tsc_hz;       /* guest TSC ticks per second */
	u64 dirty_rate;   /* bytes per second, all vCPUs together; may change at any time */
	u64 nr_vcpus;
	u64 work_gpa;     /* first workload page */
	u64 work_pages;   /* number of workload pages */
	u64 vtab_gpa;     /* per-page version table, one u32 per workload page */
	u64 verify_cmd;   /* generation: bump to ask every vCPU to verify its pages */
	u64 clock_skew;   /* added to every TSC read: lets tests jump the guest's clock */
	u64 doorbell_gpa; /* non-zero: write a TSC tick count here to sleep that long */
};

/* Written by vCPU i at MAILBOX_GPA + STATUS_OFFSET + i * STATUS_STRIDE. */
struct vcpu_status {
	u64 phase;
	u64 heartbeat;
	u64 pages_filled;
	u64 pages_dirtied;
	u64 verify_gen;        /* last verify_cmd generation answered */
	u64 verify_checked;
	u64 verify_mismatches;
	u64 first_mismatch;    /* workload page index, or ~0 */
	u64 last_tsc;
	u64 rate_seen;         /* dirty_rate the pacing currently uses */
	u64 slice_lo;
	u64 slice_hi;
};

#endif
