/*
 * Host build of a simulated sensor node: three ADC channels of a motor (phase current with
 * 50 Hz ripple, winding temperature, vibration) streamed over a pseudo-terminal with the fwb
 * protocol, and firmware updates into a file-backed A/B flash.
 *
 * The node creates the pty itself (like socat) and prints "PTY <path>" on stdout; --link adds
 * a stable symlink.  Fault injection (--drop-prob, --corrupt-prob, --garbage-prob) damages
 * outgoing frames on the wire and logs each damaged frame to --fault-log, so a test can check
 * the gateway's loss accounting against the truth.
 *
 * A "simulated image" starts with "SIMG", u32 flags (1: self-test fails, 2: silent), u32
 * version; anything else fails the self-test.  A trial image that is not committed within
 * --trial-timeout-ms reboots the node, which rolls back to the previous slot.
 *
 * SIGUSR1 reboots the node (a reset button, a brown-out); SIGUSR2 reboots it with its boot HELLO
 * lost on the wire, as a noisy line or a busy gateway may lose it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "fwb.h"

#ifdef FWB_HAVE_SODIUM
#include <sodium.h>
#endif

#define N_CH 3
#define IMG_FLAG_SELFTEST_FAIL 1u
#define IMG_FLAG_SILENT 2u
#define FACTORY_IMAGE_LEN 16384u

static volatile sig_atomic_t g_stop = 0;
static volatile sig_atomic_t g_reset = 0; /* 1: reboot, 2: reboot and lose the boot HELLO */
static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}
static void on_reset(int sig) { g_reset = sig == SIGUSR2 ? 2 : 1; }

typedef struct {
    /* options */
    const char *link, *flash_path, *node_id, *target, *fault_log_path;
    uint64_t seed;
    uint32_t tick_hz, tick_start, slot_size, factory_version, trial_timeout_ms;
    double drift_ppm, drop_p, corrupt_p, garbage_p;
    uint8_t pubkey[32];
    int have_pubkey;
    /* state */
    int master, slave_keep, flash_fd;
    FILE *fault_log;
    uint64_t boot_us;
    int reboot;
    uint64_t rng, fault_rng;
    unsigned long sent, dropped, corrupted, garbage, tx_full, lost_samples;
} sim;

static uint64_t mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* splitmix64: small, seedable, good enough for noise and fault dice. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double uniform(uint64_t *s) { return (double)(next_u64(s) >> 11) * (1.0 / 9007199254740992.0); }
static double gauss(uint64_t *s) {
    double u1 = uniform(s), u2 = uniform(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* Node time (seconds since boot on the node's own, drifting, clock). */
static double node_seconds(const sim *s) {
    return (double)(mono_us() - s->boot_us) * (1.0 + s->drift_ppm * 1e-6) / 1e6;
}
static uint32_t ticks_at(const sim *s, double node_s) {
    return s->tick_start + (uint32_t)(uint64_t)llround(node_s * (double)s->tick_hz);
}
static uint32_t hal_ticks(void *ctx) {
    sim *s = ctx;
    return ticks_at(s, node_seconds(s));
}

/* ---- flash in a file ------------------------------------------------------------------ */
static int fl_read(void *ctx, uint32_t addr, uint8_t *out, uint32_t len) {
    sim *s = ctx;
    return pread(s->flash_fd, out, len, addr) == (ssize_t)len ? 0 : -1;
}
static int fl_write(void *ctx, uint32_t addr, const uint8_t *data, uint32_t len) {
    sim *s = ctx;
    return pwrite(s->flash_fd, data, len, addr) == (ssize_t)len ? 0 : -1;
}
static int fl_erase(void *ctx, uint32_t addr, uint32_t len) {
    sim *s = ctx;
    uint8_t ff[4096];
    memset(ff, 0xFF, sizeof(ff));
    for (uint32_t at = 0; at < len;) {
        uint32_t n = len - at < sizeof(ff) ? len - at : (uint32_t)sizeof(ff);
        if (pwrite(s->flash_fd, ff, n, addr + at) != (ssize_t)n) return -1;
        at += n;
    }
    return 0;
}

/* ---- the wire ------------------------------------------------------------------------- */
static void write_all(sim *s, const uint8_t *b, size_t len) {
    while (len) {
        ssize_t w = write(s->master, b, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            s->tx_full++; /* a UART does not block either: the frame is lost, the peer resyncs */
            return;
        }
        b += w;
        len -= (size_t)w;
    }
}

static void log_fault(sim *s, const char *what, uint8_t type, uint16_t seq, const uint8_t *p, size_t plen) {
    fwb_samples smp;
    if (type == FWB_T_SAMPLES && fwb_samples_decode(p, plen, &smp) == 0) {
        s->lost_samples += smp.n;
        if (s->fault_log) {
            fprintf(s->fault_log, "%s seq=%u type=%u channel=%u n=%u index=%u\n", what, seq, type, smp.channel,
                    smp.n, smp.first_index);
        }
    } else if (s->fault_log) {
        fprintf(s->fault_log, "%s seq=%u type=%u\n", what, seq, type);
    }
    if (s->fault_log) fflush(s->fault_log);
}

static void hal_send(void *ctx, const uint8_t *wire, size_t len, uint8_t type, uint16_t seq, const uint8_t *p,
                     size_t plen) {
    sim *s = ctx;
    uint8_t buf[FWB_MAX_WIRE + 32];
    s->sent++;
    if (s->garbage_p > 0 && uniform(&s->fault_rng) < s->garbage_p) {
        /* line noise between frames: bytes that end in a delimiter and decode to nothing valid */
        size_t n = 1 + next_u64(&s->fault_rng) % 16u;
        for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)next_u64(&s->fault_rng);
        buf[n] = 0;
        write_all(s, buf, n + 1);
        s->garbage++;
    }
    if (s->drop_p > 0 && uniform(&s->fault_rng) < s->drop_p) {
        s->dropped++;
        log_fault(s, "drop", type, seq, p, plen);
        return;
    }
    memcpy(buf, wire, len);
    if (s->corrupt_p > 0 && uniform(&s->fault_rng) < s->corrupt_p && len > 1) {
        size_t at = next_u64(&s->fault_rng) % (len - 1u); /* never the delimiter */
        uint8_t flip;
        do {
            flip = (uint8_t)(1u + next_u64(&s->fault_rng) % 255u);
        } while ((uint8_t)(buf[at] ^ flip) == 0); /* no new delimiter: one damaged frame, not two */
        buf[at] ^= flip;
        s->corrupted++;
        log_fault(s, "corrupt", type, seq, p, plen);
    }
    write_all(s, buf, len);
}

static void hal_reboot(void *ctx) {
    sim *s = ctx;
    s->reboot = 1;
}

/* ---- signals -------------------------------------------------------------------------- */
typedef struct {
    double phase[4], level;
} chan_state;

static double signal_value(const sim *s, chan_state *cs, uint64_t *rng, int ch, double t) {
    (void)s;
    switch (ch) {
    case 0: { /* motor phase current, A: 50 Hz with 5th/7th harmonics and a slow load cycle */
        double irms = cs->level * (1.0 + 0.05 * sin(2.0 * M_PI * t / 20.0 + cs->phase[3]));
        double w = 2.0 * M_PI * 50.0 * t + cs->phase[0];
        return M_SQRT2 * irms * (sin(w) + 0.04 * sin(5.0 * w + cs->phase[1]) + 0.02 * sin(7.0 * w + cs->phase[2])) +
               0.02 * gauss(rng);
    }
    case 1: /* winding temperature, Cel: warming towards steady state, slow load wander */
        return cs->level + 12.0 * (1.0 - exp(-t / 900.0)) + 0.6 * sin(2.0 * M_PI * t / 300.0 + cs->phase[0]) +
               0.03 * gauss(rng);
    default: /* bearing housing vibration, g: 1x shaft (24.6 Hz) and outer-race tone (89.3 Hz) */
        return cs->level * sin(2.0 * M_PI * 24.6 * t + cs->phase[0]) +
               0.06 * sin(2.0 * M_PI * 89.3 * t + cs->phase[1]) + 0.04 * gauss(rng);
    }
}

static const fwb_channel CHANNELS[N_CH] = {
    {0, 0, 500000u, 0.001f, 0.0f, "motor_current", "A"},
    {1, 0, 10000u, 0.01f, 0.0f, "winding_temp", "Cel"},
    {2, 0, 250000u, 0.0005f, 0.0f, "vibration", "g"},
};

/* ---- boot and run ------------------------------------------------------------------------ */
static void make_sim_image(uint8_t *img, uint32_t len, uint32_t version, uint32_t flags) {
    uint64_t r = 0x51D0u + version;
    memset(img, 0, len);
    memcpy(img, "SIMG", 4);
    for (int i = 0; i < 4; i++) {
        img[4 + i] = (uint8_t)(flags >> (8 * i));
        img[8 + i] = (uint8_t)(version >> (8 * i));
    }
    for (uint32_t i = 12; i < len; i++) img[i] = (uint8_t)next_u64(&r);
}

/* 0 healthy, else the reason; *flags gets the image's flags. */
static int self_test(sim *s, fwb_update *u, uint32_t *flags) {
    const fwb_slot *sl = &u->meta.slot[u->meta.active];
    uint8_t sha[FWB_SHA_LEN], head[12];
    *flags = 0;
    if (fwb_slot_sha256(u, u->meta.active, sl->size, sha) != 0 || memcmp(sha, sl->sha256, FWB_SHA_LEN) != 0) {
        return 1; /* the slot no longer holds the image it was verified with */
    }
    if (sl->size < sizeof(head) || fl_read(s, fwb_slot_addr(u, u->meta.active), head, sizeof(head)) != 0 ||
        memcmp(head, "SIMG", 4) != 0) {
        return 2; /* not an image this board can run */
    }
    *flags = (uint32_t)head[4] | ((uint32_t)head[5] << 8) | ((uint32_t)head[6] << 16) | ((uint32_t)head[7] << 24);
    return (*flags & IMG_FLAG_SELFTEST_FAIL) ? 3 : 0;
}

static void version_str(uint32_t v, char *out, size_t cap) {
    snprintf(out, cap, "%u.%u.%u", v >> 24, (v >> 16) & 0xFFu, v & 0xFFFFu);
}

static int run_boot(sim *s) {
    fwb_update upd;
    fwb_flash fl = {s, fl_read, fl_write, fl_erase};
    fwb_update_init(&upd, &fl, s->slot_size, s->target, s->have_pubkey ? s->pubkey : NULL);
    if (fwb_update_boot(&upd) != 0) {
        static uint8_t img[FACTORY_IMAGE_LEN];
        make_sim_image(img, sizeof(img), s->factory_version, 0);
        if (fwb_update_format(&upd, s->factory_version, img, sizeof(img)) != 0 || fwb_update_boot(&upd) != 0) {
            fprintf(stderr, "sim node: cannot format the flash file %s\n", s->flash_path);
            return -1;
        }
    }
    s->boot_us = mono_us();
    s->reboot = 0;
    int hello_lost = g_reset == 2;
    g_reset = 0;
    uint32_t flags = 0;
    int bad = self_test(s, &upd, &flags);
    uint8_t boot_state = fwb_update_boot_state(&upd);
    char vs[32];
    version_str(upd.meta.slot[upd.meta.active].version, vs, sizeof(vs));
    fprintf(stderr, "sim node: boot version=%s slot=%c state=%s health=%s\n", vs, 'A' + upd.meta.active,
            boot_state == FWB_BOOT_TRIAL ? "trial" : boot_state == FWB_BOOT_ROLLED_BACK ? "rolled-back" : "confirmed",
            bad ? "failed" : "ok");

    fwb_node node;
    fwb_node_hal hal = {s, hal_ticks, hal_send, hal_reboot};
    fwb_node_init(&node, &hal, &upd, s->node_id, s->tick_hz, CHANNELS, N_CH);
    node.health = bad ? FWB_HEALTH_FAILED : FWB_HEALTH_OK;
    int silent = boot_state == FWB_BOOT_TRIAL && (flags & IMG_FLAG_SILENT);

    uint8_t flush = 0;
    if (!silent) {
        write_all(s, &flush, 1); /* ends whatever partial frame the gateway may hold */
        if (hello_lost) {
            node.tx_seq++; /* sent, as far as the node knows, and lost on the wire */
        } else {
            fwb_node_send_hello(&node);
        }
    }
    uint64_t reboot_at = 0;
    if (bad) fwb_node_send_error(&node, FWB_ERR_SELFTEST, (uint32_t)bad, "self-test failed");
    if (bad && boot_state == FWB_BOOT_TRIAL) {
        reboot_at = s->boot_us + 300000u; /* let the report out, then fall back to the old slot */
    } else if (boot_state == FWB_BOOT_TRIAL) {
        reboot_at = s->boot_us + (uint64_t)s->trial_timeout_ms * 1000u;
    }

    chan_state cs[N_CH];
    fwb_samples batch[N_CH];
    uint32_t next_index[N_CH];
    unsigned batch_n[N_CH];
    s->rng = s->seed * 0x2545F4914F6CDD1Dull + 1u;
    for (int c = 0; c < N_CH; c++) {
        for (int k = 0; k < 4; k++) cs[c].phase[k] = 2.0 * M_PI * uniform(&s->rng);
        next_index[c] = 0;
        memset(&batch[c], 0, sizeof(batch[c]));
        batch[c].channel = (uint8_t)c;
        double rate = CHANNELS[c].rate_mhz / 1000.0;
        unsigned n = (unsigned)(rate / 10.0); /* about one batch per 100 ms */
        batch_n[c] = n < 1 ? 1 : n > FWB_MAX_SAMPLES ? FWB_MAX_SAMPLES : n;
    }
    cs[0].level = 4.2 * (1.0 + 0.05 * (uniform(&s->rng) - 0.5));
    cs[1].level = 40.0 + 4.0 * uniform(&s->rng);
    cs[2].level = 0.25 * (1.0 + 0.2 * (uniform(&s->rng) - 0.5));

    uint8_t in[512];
    while (!g_stop && !s->reboot && !g_reset) {
        struct pollfd pfd = {s->master, POLLIN, 0};
        int pr = poll(&pfd, 1, 5);
        if (pr > 0 && (pfd.revents & POLLIN)) {
            ssize_t n = read(s->master, in, sizeof(in));
            if (n > 0 && !silent) fwb_node_rx(&node, in, (size_t)n);
        }
        uint64_t now = mono_us();
        if (upd.meta.slot[upd.meta.active].state == FWB_SLOT_CONFIRMED) reboot_at = 0; /* committed */
        if (reboot_at && now >= reboot_at) {
            fprintf(stderr, "sim node: %s, rebooting\n", bad ? "self-test failed" : "trial not committed in time");
            break;
        }
        if (silent || bad) continue;
        double t_now = node_seconds(s);
        for (int c = 0; c < N_CH; c++) {
            double rate = CHANNELS[c].rate_mhz / 1000.0;
            while ((double)next_index[c] / rate <= t_now) {
                double t = (double)next_index[c] / rate;
                double v = signal_value(s, &cs[c], &s->rng, c, t);
                double raw = floor((v - CHANNELS[c].offset) / CHANNELS[c].scale + 0.5);
                if (raw > 32767.0) raw = 32767.0;
                if (raw < -32767.0) raw = -32767.0;
                fwb_samples *b = &batch[c];
                if (b->n == 0) {
                    b->first_index = next_index[c];
                    b->first_tick = ticks_at(s, t);
                }
                b->raw[b->n++] = (int16_t)raw;
                next_index[c]++;
                if (b->n >= batch_n[c]) {
                    fwb_node_send_samples(&node, b);
                    b->n = 0;
                }
            }
        }
    }
    return 0;
}

static int parse_hex(const char *hex, uint8_t *out, size_t n) {
    if (strlen(hex) < 2 * n) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int read_pubkey(sim *s, const char *path) {
    char line[256] = {0};
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(line, 1, sizeof(line) - 1, f);
    fclose(f);
    line[n] = 0;
    return parse_hex(line, s->pubkey, 32);
}

static void usage(void) {
    fprintf(stderr,
            "usage: sim_node --flash FILE [--link PATH] [--node-id ID] [--target T] [--seed N]\n"
            "  [--tick-hz HZ] [--tick-start T] [--drift-ppm P] [--pubkey-file F] [--trial-timeout-ms MS]\n"
            "  [--slot-size BYTES] [--factory-version V] [--drop-prob P] [--corrupt-prob P]\n"
            "  [--garbage-prob P] [--fault-log FILE]\n");
}

int main(int argc, char **argv) {
    static sim s;
    memset(&s, 0, sizeof(s));
    s.node_id = "SIM-0001";
    s.target = "edgetwin-sim-adc3";
    s.tick_hz = 1000000u;
    s.slot_size = 262144u;
    s.factory_version = 0x01000000u;
    s.trial_timeout_ms = 10000u;
    enum { O_LINK = 1, O_FLASH, O_NODE, O_TARGET, O_SEED, O_TICKHZ, O_TICK0, O_DRIFT, O_PUB, O_TRIAL, O_SLOT,
           O_FACTORY, O_DROP, O_CORRUPT, O_GARBAGE, O_FAULTLOG };
    static const struct option opts[] = {
        {"link", 1, 0, O_LINK},          {"flash", 1, 0, O_FLASH},
        {"node-id", 1, 0, O_NODE},       {"target", 1, 0, O_TARGET},
        {"seed", 1, 0, O_SEED},          {"tick-hz", 1, 0, O_TICKHZ},
        {"tick-start", 1, 0, O_TICK0},   {"drift-ppm", 1, 0, O_DRIFT},
        {"pubkey-file", 1, 0, O_PUB},    {"trial-timeout-ms", 1, 0, O_TRIAL},
        {"slot-size", 1, 0, O_SLOT},     {"factory-version", 1, 0, O_FACTORY},
        {"drop-prob", 1, 0, O_DROP},     {"corrupt-prob", 1, 0, O_CORRUPT},
        {"garbage-prob", 1, 0, O_GARBAGE}, {"fault-log", 1, 0, O_FAULTLOG},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case O_LINK: s.link = optarg; break;
        case O_FLASH: s.flash_path = optarg; break;
        case O_NODE: s.node_id = optarg; break;
        case O_TARGET: s.target = optarg; break;
        case O_SEED: s.seed = strtoull(optarg, NULL, 0); break;
        case O_TICKHZ: s.tick_hz = (uint32_t)strtoul(optarg, NULL, 0); break;
        case O_TICK0: s.tick_start = (uint32_t)strtoul(optarg, NULL, 0); break;
        case O_DRIFT: s.drift_ppm = strtod(optarg, NULL); break;
        case O_PUB:
            if (read_pubkey(&s, optarg) != 0) {
                fprintf(stderr, "sim node: %s: expected 64 hex digits (an Ed25519 public key)\n", optarg);
                return 2;
            }
            s.have_pubkey = 1;
            break;
        case O_TRIAL: s.trial_timeout_ms = (uint32_t)strtoul(optarg, NULL, 0); break;
        case O_SLOT: s.slot_size = (uint32_t)strtoul(optarg, NULL, 0); break;
        case O_FACTORY: s.factory_version = (uint32_t)strtoul(optarg, NULL, 0); break;
        case O_DROP: s.drop_p = strtod(optarg, NULL); break;
        case O_CORRUPT: s.corrupt_p = strtod(optarg, NULL); break;
        case O_GARBAGE: s.garbage_p = strtod(optarg, NULL); break;
        case O_FAULTLOG: s.fault_log_path = optarg; break;
        default: usage(); return 2;
        }
    }
    if (!s.flash_path || s.tick_hz == 0 || s.slot_size < FACTORY_IMAGE_LEN || strlen(s.node_id) > FWB_MAX_STR ||
        strlen(s.target) > FWB_MAX_STR) {
        usage();
        return 2;
    }
#ifdef FWB_HAVE_SODIUM
    if (sodium_init() < 0) {
        fprintf(stderr, "sim node: libsodium failed to initialise\n");
        return 1;
    }
#else
    if (s.have_pubkey) fprintf(stderr, "sim node: built without libsodium: hash-only verification\n");
#endif
    s.flash_fd = open(s.flash_path, O_RDWR | O_CREAT, 0600);
    if (s.flash_fd < 0 || ftruncate(s.flash_fd, fwb_flash_size(s.slot_size)) != 0) {
        fprintf(stderr, "sim node: cannot open flash file %s: %s\n", s.flash_path, strerror(errno));
        return 1;
    }
    if (s.fault_log_path) {
        s.fault_log = fopen(s.fault_log_path, "a");
        if (!s.fault_log) {
            fprintf(stderr, "sim node: cannot open %s: %s\n", s.fault_log_path, strerror(errno));
            return 1;
        }
    }
    s.fault_rng = s.seed ^ 0xFA17u;

    s.master = posix_openpt(O_RDWR | O_NOCTTY);
    if (s.master < 0 || grantpt(s.master) != 0 || unlockpt(s.master) != 0) {
        fprintf(stderr, "sim node: cannot create a pty: %s\n", strerror(errno));
        return 1;
    }
    const char *path = ptsname(s.master);
    struct termios tio;
    tcgetattr(s.master, &tio);
    cfmakeraw(&tio);
    tcsetattr(s.master, TCSANOW, &tio);
    /* Keep the slave open ourselves so the pty survives the gateway closing and reopening it. */
    s.slave_keep = open(path, O_RDWR | O_NOCTTY);
    if (s.slave_keep >= 0) {
        tcgetattr(s.slave_keep, &tio);
        cfmakeraw(&tio);
        tcsetattr(s.slave_keep, TCSANOW, &tio);
    }
    fcntl(s.master, F_SETFL, fcntl(s.master, F_GETFL) | O_NONBLOCK);
    if (s.link) {
        unlink(s.link);
        if (symlink(path, s.link) != 0) {
            fprintf(stderr, "sim node: cannot link %s -> %s: %s\n", s.link, path, strerror(errno));
            return 1;
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_reset;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    printf("PTY %s\n", path);
    fflush(stdout);

    int rc = 0;
    while (!g_stop) {
        if (run_boot(&s) != 0) {
            rc = 1;
            break;
        }
    }
    fprintf(stderr, "sim node: stats sent=%lu dropped=%lu corrupted=%lu garbage=%lu tx_full=%lu lost_samples=%lu\n",
            s.sent, s.dropped, s.corrupted, s.garbage, s.tx_full, s.lost_samples);
    if (s.link) unlink(s.link);
    if (s.fault_log) fclose(s.fault_log);
    close(s.flash_fd);
    return rc;
}
