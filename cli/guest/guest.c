/*
 * Ferry demo guest workload. Runs entirely in ring 3 (this machine's KVM runs guest ring 0
 * very slowly), with no interrupts and no exits: everything it says goes through the
 * mailbox page that the host reads and writes through its mapping of guest RAM.
 *
 * Each vCPU owns a contiguous slice of the workload pages. It fills each page with
 * pseudo-random, never-zero words derived from (seed, page, version 1), then rewrites
 * randomly chosen pages with the next version at the requested rate, paced by the TSC,
 * recording each page's version in a table in guest RAM. On a verify request it recomputes
 * every page of its slice from the table and counts the pages that differ, so a page that
 * arrived stale (older version), zero, or misplaced after a migration is a mismatch.
 */
#include "mailbox.h"

#define PAGE_WORDS 512UL
#define PAGE_SHIFT 12

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/*
 * The guest's clock: the TSC plus a host-set skew (0 unless a test jumps the clock). It is a
 * 64-bit counter that may wrap (a destination booted minutes ago reads a TSC far behind the
 * source's), so readings are only ever compared as signed differences, never with < or >.
 */
static inline u64 guest_clock(volatile struct mailbox *mb)
{
	return rdtsc() + mb->clock_skew;
}

/*
 * Gives the CPU back for about `ticks` TSC ticks. A write to the doorbell (a guest physical
 * address outside RAM) exits to the host, whose vCPU thread sleeps and re-enters: ring 3
 * has no HLT, and spinning would take a whole host core from the migration. Without a
 * doorbell, spin once.
 */
static inline void snooze(volatile struct mailbox *mb, u64 ticks)
{
	u64 bell = mb->doorbell_gpa;
	if (bell)
		*(volatile u64 *)bell = ticks;
	else
		__asm__ volatile("pause" ::: "memory");
}

static inline void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

static inline u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* Start state of a page's word stream; never zero, so no word is ever zero. */
static inline u64 page_state(u64 seed, u64 page, u64 version)
{
	u64 s = mix64(seed + page * 0x9e3779b97f4a7c15UL);
	s = mix64(s ^ (version * 0xc2b2ae3d27d4eb4fUL));
	return s ? s : 0x2545f4914f6cdd1dUL;
}

static inline u64 next_word(u64 s)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

static void fill_page(u64 *dst, u64 seed, u64 page, u64 version)
{
	u64 s = page_state(seed, page, version);
	for (u64 i = 0; i < PAGE_WORDS; i++) {
		s = next_word(s);
		dst[i] = s;
	}
}

static int check_page(const u64 *src, u64 seed, u64 page, u64 version)
{
	u64 s = page_state(seed, page, version);
	u64 diff = 0;
	for (u64 i = 0; i < PAGE_WORDS; i++) {
		s = next_word(s);
		diff |= src[i] ^ s;
	}
	return diff == 0;
}

void guest_main(u64 idx)
{
	volatile struct mailbox *mb = (volatile struct mailbox *)MAILBOX_GPA;
	volatile struct vcpu_status *st = (volatile struct vcpu_status *)(MAILBOX_GPA +
		STATUS_OFFSET + idx * STATUS_STRIDE);
	const u64 seed = mb->seed;
	const u64 ncpu = mb->nr_vcpus;
	const u64 n = mb->work_pages;
	const u64 work = mb->work_gpa;
	volatile u32 *vtab = (volatile u32 *)mb->vtab_gpa;
	const u64 lo = n * idx / ncpu;
	const u64 hi = n * (idx + 1) / ncpu;
	const u64 count = hi - lo;

	st->slice_lo = lo;
	st->slice_hi = hi;
	st->first_mismatch = ~0UL;
	st->phase = PHASE_FILLING;
	for (u64 p = lo; p < hi; p++) {
		fill_page((u64 *)(work + (p << PAGE_SHIFT)), seed, p, 1);
		barrier();
		vtab[p] = 1;
		st->pages_filled++;
		st->heartbeat++;
	}

	u64 rng = mix64(seed ^ ((idx + 1) * 0xd1b54a32d192ed03UL));
	u64 rate = ~0UL, hz = 0, interval = 0;
	u64 next = guest_clock(mb);
	for (;;) {
		st->heartbeat++;

		u64 cmd = mb->verify_cmd;
		if (cmd != st->verify_gen) {
			st->phase = PHASE_VERIFYING;
			u64 checked = 0, bad = 0, first = ~0UL;
			for (u64 p = lo; p < hi; p++) {
				u32 v = vtab[p];
				checked++;
				if (v == 0 || !check_page((const u64 *)(work + (p << PAGE_SHIFT)),
							  seed, p, v)) {
					if (bad == 0)
						first = p;
					bad++;
				}
				st->heartbeat++;
			}
			st->verify_checked = checked;
			st->verify_mismatches = bad;
			st->first_mismatch = first;
			barrier();
			st->verify_gen = cmd;
			next = guest_clock(mb);
		}

		u64 r = mb->dirty_rate, h = mb->tsc_hz;
		if (r != rate || h != hz) {
			rate = r;
			hz = h;
			st->rate_seen = r;
			/* TSC ticks between two page writes of this vCPU. */
			interval = (r && h && count) ? (h * 4096UL * ncpu) / r : 0;
			if (r && h && count && interval == 0)
				interval = 1;
			next = guest_clock(mb);
		}

		u64 now = guest_clock(mb);
		st->last_tsc = now;
		if (interval == 0) {
			st->phase = PHASE_IDLE;
			snooze(mb, hz / 100);
			continue;
		}
		st->phase = PHASE_DIRTYING;
		long ahead = (long)(next - now);
		if (ahead > 0) {
			/* A deadline more than a second beyond one interval away means the
			 * clock went backwards (e.g. a TSC that differs after a migration):
			 * restart pacing instead of waiting for it. */
			if ((u64)ahead > interval + hz) {
				next = now;
			} else {
				/* Sleep at least 1 ms: pages that fall due meanwhile are
				 * written back to back on waking, so the average rate holds
				 * while the guest exits at most ~1000 times a second. */
				u64 quantum = hz / 1000;
				snooze(mb, (u64)ahead > quantum ? (u64)ahead : quantum);
				continue;
			}
		} else if ((u64)(-ahead) > hz / 10 && (u64)(-ahead) > interval) {
			/* More than 100 ms behind (paused, descheduled, migrated): drop the
			 * backlog rather than write it in a burst. */
			next = now;
		}

		rng = next_word(rng);
		u64 p = lo + rng % count;
		u32 v = vtab[p] + 1;
		if (v == 0)
			v = 1;
		fill_page((u64 *)(work + (p << PAGE_SHIFT)), seed, p, v);
		barrier();
		vtab[p] = v;
		st->pages_dirtied++;
		next += interval;
	}
}
