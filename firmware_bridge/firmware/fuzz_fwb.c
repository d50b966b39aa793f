/*
 * Fuzzing of the frame decoder and the node's request handling.
 *
 * Built with clang -fsanitize=fuzzer,address -DFWB_LIBFUZZER it is a libFuzzer target.
 * Otherwise it is a long seeded randomized test (run it under -fsanitize=address,undefined):
 * random byte runs, valid frames of every type with random payloads, and valid frames with
 * bit flips, inserted/deleted bytes and truncation, all into one decoder and one node.
 * Invariants: no crash or sanitizer report; every undamaged frame that follows a delimiter is
 * decoded exactly; nothing longer than the maximum frame is ever produced; COBS round-trips.
 *
 * usage: fuzz_fwb [ITERATIONS [SEED]]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fwb.h"

#define SLOT 4096u
#include "ram_flash.h"

static unsigned long sent_frames;
static uint32_t fake_ticks(void *ctx) {
    (void)ctx;
    return 12345u;
}
static void count_send(void *ctx, const uint8_t *wire, size_t len, uint8_t type, uint16_t seq, const uint8_t *p,
                       size_t plen) {
    (void)ctx;
    (void)type;
    (void)seq;
    (void)p;
    if (len > FWB_MAX_WIRE || plen > FWB_MAX_PAYLOAD || wire[len - 1] != 0) abort();
    sent_frames++;
}
static void no_reboot(void *ctx) { (void)ctx; }

static fwb_update upd;
static fwb_node node;
static const fwb_channel CH[1] = {{0, 0, 1000000u, 1.0f, 0.0f, "ch0", "V"}};

static void setup(void) {
    static int done;
    if (done) return;
    done = 1;
    fwb_flash fl = {NULL, ram_read, ram_write, ram_erase};
    uint8_t img[64];
    memset(img, 0xA5, sizeof(img));
    fwb_update_init(&upd, &fl, SLOT, "fuzz", NULL);
    fwb_update_format(&upd, 1, img, sizeof(img));
    fwb_update_boot(&upd);
    fwb_node_hal hal = {NULL, fake_ticks, count_send, no_reboot};
    fwb_node_init(&node, &hal, &upd, "F", 1000u, CH, 1);
    node.health = FWB_HEALTH_OK;
}

/* Run every body decoder on a frame: they must reject or accept without touching memory
 * they do not own. */
static void decode_all(const fwb_frame *f) {
    fwb_hello h;
    fwb_channel c;
    fwb_samples s;
    fwb_nack n;
    fwb_error e;
    fwb_manifest m;
    fwb_chunk k;
    size_t used;
    if (f->len > FWB_MAX_PAYLOAD) abort();
    (void)fwb_hello_decode(f->payload, f->len, &h);
    (void)fwb_channel_decode(f->payload, f->len, &c);
    (void)fwb_samples_decode(f->payload, f->len, &s);
    (void)fwb_nack_decode(f->payload, f->len, &n);
    (void)fwb_error_decode(f->payload, f->len, &e);
    (void)fwb_manifest_decode(f->payload, f->len, &m, &used);
    (void)fwb_chunk_decode(f->payload, f->len, &k);
}

#ifdef FWB_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static fwb_rx rx;
    setup();
    fwb_rx_init(&rx);
    for (size_t i = 0; i < size; i++) {
        if (fwb_rx_byte(&rx, data[i]) == FWB_RX_FRAME) decode_all(&rx.frame);
    }
    fwb_node_rx(&node, data, size);
    return 0;
}
#else
static uint64_t rng_state;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static const uint8_t TYPES[] = {FWB_T_HELLO,  FWB_T_HELLO_REQ, FWB_T_CHANNEL_REQ, FWB_T_SAMPLES,
                                FWB_T_ACK,    FWB_T_NACK,      FWB_T_ERROR,       FWB_T_TIME_SYNC,
                                FWB_T_FW_BEGIN, FWB_T_FW_CHUNK, FWB_T_FW_VERIFY,  FWB_T_FW_COMMIT,
                                FWB_T_FW_ABORT, FWB_T_REBOOT,   0x7F};

int main(int argc, char **argv) {
    unsigned long iterations = argc > 1 ? strtoul(argv[1], NULL, 0) : 1000000ul;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5EEDu;
    if (rng_state == 0) rng_state = 1;
    setup();
    static fwb_rx rx;
    fwb_rx_init(&rx);
    unsigned long clean = 0, recovered = 0, damaged = 0, bytes = 0, cobs_trips = 0;
    uint8_t payload[FWB_MAX_PAYLOAD], wire[FWB_MAX_WIRE + 64], buf[600], back[600], enc[700];
    for (unsigned long it = 0; it < iterations; it++) {
        unsigned kind = rnd() % 4u;
        size_t n = 0;
        int expect = 0;
        uint8_t type = TYPES[rnd() % sizeof(TYPES)];
        uint16_t seq = (uint16_t)rnd();
        size_t plen = rnd() % (FWB_MAX_PAYLOAD + 1u);
        if (rnd() % 4u == 0) plen = rnd() % 16u; /* short payloads reach more decoder branches */
        for (size_t i = 0; i < plen; i++) payload[i] = (rnd() % 3u == 0) ? 0 : (uint8_t)rnd();
        if (kind == 0) { /* random bytes, few delimiters */
            n = rnd() % 300u;
            for (size_t i = 0; i < n; i++) buf[i] = (rnd() % 40u == 0) ? 0 : (uint8_t)rnd();
        } else {
            buf[0] = 0; /* resynchronise first, so an undamaged frame must come through */
            size_t w = fwb_frame_encode(type, seq, payload, plen, wire, sizeof(wire));
            if (w == 0) abort();
            memcpy(buf + 1, wire, w);
            n = w + 1;
            if (kind == 1) {
                expect = 1;
                clean++;
            } else if (kind == 2) { /* bit flips */
                unsigned flips = 1 + rnd() % 3u;
                for (unsigned f = 0; f < flips; f++) buf[1 + rnd() % w] ^= (uint8_t)(1u << (rnd() % 8u));
                damaged++;
            } else { /* insert, delete or truncate */
                unsigned op = rnd() % 3u;
                size_t at = 1 + rnd() % w;
                if (op == 0 && n < sizeof(buf) - 1) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = (uint8_t)rnd();
                    n++;
                } else if (op == 1 && n > 2) {
                    memmove(buf + at, buf + at + 1, n - at - 1);
                    n--;
                } else {
                    n = at;
                }
                damaged++;
            }
        }
        bytes += n;
        int got = 0;
        for (size_t i = 0; i < n; i++) {
            if (fwb_rx_byte(&rx, buf[i]) == FWB_RX_FRAME) {
                const fwb_frame *f = &rx.frame;
                decode_all(f);
                if (expect && i == n - 1) {
                    if (f->type != type || f->seq != seq || f->len != plen || (plen && memcmp(f->payload, payload, plen)))
                        abort();
                    got = 1;
                }
            }
        }
        if (expect && !got) {
            fprintf(stderr, "iteration %lu: an undamaged frame was not decoded\n", it);
            return 1;
        }
        recovered += (unsigned long)got;
        /* the node sees the same bytes: every request path runs on fuzzed input */
        if (rnd() % 8u == 0) fwb_node_rx(&node, buf, n);
        /* COBS round trip on arbitrary data */
        if (rnd() % 16u == 0) {
            size_t m = rnd() % 600u;
            for (size_t i = 0; i < m; i++) buf[i] = (rnd() % 4u == 0) ? 0 : (uint8_t)rnd();
            size_t e = fwb_cobs_encode(buf, m, enc, sizeof(enc));
            long d = fwb_cobs_decode(enc, e, back, sizeof(back));
            if (e == 0 || memchr(enc, 0, e) || d != (long)m || memcmp(back, buf, m) != 0) abort();
            cobs_trips++;
        }
    }
    unsigned long dropped = 0;
    for (int r = 0; r < FWB_RX_REASONS; r++) dropped += rx.errors[r];
    printf("fuzz_fwb: %lu iterations, %lu bytes, %lu clean frames all recovered, %lu damaged, %lu dropped "
           "(oversize %u cobs %u short %u crc %u version %u), %lu cobs round trips, %lu node replies\n",
           iterations, bytes, recovered, damaged, dropped, rx.errors[FWB_RX_OVERSIZE], rx.errors[FWB_RX_COBS],
           rx.errors[FWB_RX_SHORT], rx.errors[FWB_RX_CRC], rx.errors[FWB_RX_VERSION], cobs_trips, sent_frames);
    if (recovered != clean) return 1;
    printf("%lu passed, 0 failed\n", iterations);
    return 0;
}
#endif
