/*
 * dirtier: the init program of the p2v test guest.
 *
 * It fills a buffer with pseudo-random words, then every 100 ms (one tick) rewrites one
 * word in as many random pages as the dirty rate asks, re-reads a share of the buffer
 * to check it against per-slice sums kept as it writes, and prints one line:
 *
 *     tick <n> sum <64-bit hex> bad <count> passes <count> work <pages>
 *
 * `n` counts ticks, so a migrated guest must continue from the source's last value with
 * no repeat; `sum` is the sum of all words of the buffer (mod 2^64); `bad` counts slices
 * whose content no longer matched the sums (a page lost or stale after a migration);
 * `passes` counts full verifications of the buffer (one a second); `work` is the number of
 * pages written during the tick.
 *
 * Parameters come from the kernel command line: p2v_mem=MiB (buffer size, default 32),
 * p2v_rate=MB/s (pages dirtied per second x 4096, default 0), p2v_seed=N, and
 * p2v_spin=1, which spends the rest of each tick reading random pages whole and writing
 * one word in each: a CPU-bound writer, the kind auto-converge slows down.
 * Compiled with gcc -static; it needs nothing but the kernel.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_WORDS 512u              /* 4 KiB pages of 64-bit words */
#define SLICE_WORDS (131072u)        /* 1 MiB slices, each with its own running sum */
#define TICK_NS 100000000ull         /* 100 ms */
#define FULL_PASS_TICKS 10u          /* the whole buffer is re-read every second */

static uint64_t rng_state;

static uint64_t next_random(void)
{
    /* xorshift64*: fast under TCG and good enough to spread writes over pages */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static unsigned long param(const char *cmdline, const char *name, unsigned long fallback)
{
    const char *p = cmdline;
    size_t len = strlen(name);
    while ((p = strstr(p, name)) != NULL) {
        if ((p == cmdline || p[-1] == ' ') && p[len] == '=')
            return strtoul(p + len + 1, NULL, 10);
        p += len;
    }
    return fallback;
}

static void say(const char *text)
{
    size_t len = strlen(text);
    while (len) {
        ssize_t n = write(1, text, len);
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

static uint64_t *buf, *slice_sum;
static size_t pages;

static void dirty_page(int read_whole)
{
    uint64_t r = next_random();
    size_t page = (size_t)(r % pages) * PAGE_WORDS;
    size_t w = page + (size_t)((r >> 40) % PAGE_WORDS);
    uint64_t value = next_random();
    if (read_whole) {
        /* the work a computing guest does between its writes */
        for (size_t i = page; i < page + PAGE_WORDS; i++)
            value += buf[i];
    }
    slice_sum[w / SLICE_WORDS] += value - buf[w];
    buf[w] = value;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(void)
{
    char cmdline[4096] = "";
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
    }
    unsigned long mem_mib = param(cmdline, "p2v_mem", 32);
    unsigned long rate_mb = param(cmdline, "p2v_rate", 0);
    unsigned long spin = param(cmdline, "p2v_spin", 0);
    rng_state = param(cmdline, "p2v_seed", 1) * 0x9E3779B97F4A7C15ull | 1;
    if (mem_mib == 0)
        mem_mib = 1;

    size_t words = (size_t)mem_mib * SLICE_WORDS;
    size_t slices = mem_mib;
    pages = words / PAGE_WORDS;
    buf = mmap(NULL, words * 8, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    slice_sum = calloc(slices, sizeof *slice_sum);
    if (buf == MAP_FAILED || slice_sum == NULL) {
        say("p2v-dirtier: out of memory\n");
        for (;;)
            pause();
    }
    for (size_t s = 0; s < slices; s++) {
        uint64_t sum = 0;
        for (size_t i = s * SLICE_WORDS; i < (s + 1) * SLICE_WORDS; i++) {
            buf[i] = next_random();
            sum += buf[i];
        }
        slice_sum[s] = sum;
    }

    char line[160];
    snprintf(line, sizeof line, "p2v-dirtier start mem=%lu MiB rate=%lu MB/s\n", mem_mib,
             rate_mb);
    say(line);

    /* pages per tick, kept as a fraction so low rates still dirty something */
    uint64_t pages_per_tick_x1000 = (uint64_t)rate_mb * 1000000ull * 1000ull / 4096ull / 10ull;
    uint64_t carry = 0, tick = 0, bad = 0, passes = 0, spun = 0;
    size_t verify_next = 0;
    size_t verify_per_tick = (slices + FULL_PASS_TICKS - 1) / FULL_PASS_TICKS;
    uint64_t deadline = now_ns();
    for (;;) {
        tick++;
        carry += pages_per_tick_x1000;
        uint64_t writes = carry / 1000;
        carry %= 1000;
        for (uint64_t k = 0; k < writes; k++)
            dirty_page(0);
        for (size_t k = 0; k < verify_per_tick; k++) {
            size_t s = verify_next;
            uint64_t sum = 0;
            for (size_t i = s * SLICE_WORDS; i < (s + 1) * SLICE_WORDS; i++)
                sum += buf[i];
            if (sum != slice_sum[s]) {
                bad++;
                slice_sum[s] = sum; /* report each corruption once */
                snprintf(line, sizeof line, "p2v-dirtier BAD slice %zu\n", s);
                say(line);
            }
            if (++verify_next == slices) {
                verify_next = 0;
                passes++;
            }
        }
        uint64_t total = 0;
        for (size_t s = 0; s < slices; s++)
            total += slice_sum[s];
        snprintf(line, sizeof line, "tick %llu sum %016llx bad %llu passes %llu work %llu\n",
                 (unsigned long long)tick, (unsigned long long)total,
                 (unsigned long long)bad, (unsigned long long)passes,
                 (unsigned long long)(writes + spun));
        say(line);

        /* a guest paused for long does not catch up missed ticks: the counter counts
           ticks run, so a migration shows neither a gap nor a repeat */
        deadline += TICK_NS;
        uint64_t now = now_ns();
        if (deadline < now)
            deadline = now;
        spun = 0;
        while (spin && now_ns() < deadline) {
            for (int k = 0; k < 16; k++)
                dirty_page(1);
            spun += 16;
        }
        struct timespec ts = {(time_t)(deadline / 1000000000ull),
                              (long)(deadline % 1000000000ull)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
}
