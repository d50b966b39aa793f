/*
 * Unit tests of the fwb library: CRC, COBS, SHA-256, the stream decoder, the protocol test
 * vectors (built here from field values and compared with vectors.txt byte for byte), the
 * update state machine on a RAM flash, and the node's request dispatch.
 *
 * usage: test_fwb VECTORS_FILE     prints "<n> passed, <m> failed"; exit 0 only if m == 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fwb.h"

#ifdef FWB_HAVE_SODIUM
#include <sodium.h>
#endif

static int passed, failed;
#define CHECK(cond)                                                                                           \
    do {                                                                                                      \
        if (cond) {                                                                                           \
            passed++;                                                                                         \
        } else {                                                                                              \
            failed++;                                                                                         \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                   \
        }                                                                                                     \
    } while (0)

static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
    size_t n = 0;
    while (hex[0] && hex[1] && n < cap) {
        unsigned v;
        if (sscanf(hex, "%2x", &v) != 1) break;
        out[n++] = (uint8_t)v;
        hex += 2;
    }
    return n;
}

/* ---- CRC, COBS, SHA-256 ----------------------------------------------------------------- */
static void test_crc(void) {
    const uint8_t check[] = "123456789";
    CHECK(fwb_crc16(check, 9) == 0x29B1u);
    CHECK(fwb_crc32(check, 9) == 0xCBF43926u);
    CHECK(fwb_crc16(check, 0) == 0xFFFFu);
}

static void cobs_case(const char *in_hex, const char *out_hex) {
    uint8_t in[300], want[300], got[300], back[300];
    size_t n = unhex(in_hex, in, sizeof(in)), m = unhex(out_hex, want, sizeof(want));
    size_t e = fwb_cobs_encode(in, n, got, sizeof(got));
    if (e != m || memcmp(got, want, m) != 0) fprintf(stderr, "cobs case %.16s: %zu vs %zu\n", in_hex, e, m);
    CHECK(e == m && memcmp(got, want, m) == 0);
    long d = fwb_cobs_decode(want, m, back, sizeof(back));
    CHECK(d == (long)n && memcmp(back, in, n) == 0);
}

static void test_cobs(void) {
    /* The published examples (Cheshire & Baker's scheme as commonly tabulated). */
    cobs_case("00", "0101");
    cobs_case("0000", "010101");
    cobs_case("001100", "01021101");
    cobs_case("11220033", "0311220233");
    cobs_case("11223344", "0511223344");
    cobs_case("11000000", "0211010101");
    char in[600], out[600];
    /* 01..FE (254 bytes) -> FF 01..FE */
    for (int i = 1; i <= 254; i++) sprintf(in + 2 * (i - 1), "%02x", i);
    strcpy(out, "ff");
    strcat(out, in);
    cobs_case(in, out);
    /* 00 01..FE -> 01 FF 01..FE */
    strcpy(out, "01ff");
    strcat(out, in);
    char in2[600] = "00";
    strcat(in2, in);
    cobs_case(in2, out);
    /* 01..FF (255 bytes) -> FF 01..FE 02 FF */
    strcpy(in2, in);
    strcat(in2, "ff");
    strcpy(out, "ff");
    strcat(out, in);
    strcat(out, "02ff");
    cobs_case(in2, out);
    /* invalid encodings */
    uint8_t buf[16];
    const uint8_t zero_inside[] = {0x03, 0x11, 0x00};
    const uint8_t truncated[] = {0x05, 0x11, 0x22};
    const uint8_t lead_zero[] = {0x00};
    CHECK(fwb_cobs_decode(zero_inside, 3, buf, sizeof(buf)) < 0);
    CHECK(fwb_cobs_decode(truncated, 3, buf, sizeof(buf)) < 0);
    CHECK(fwb_cobs_decode(lead_zero, 1, buf, sizeof(buf)) < 0);
    const uint8_t ok[] = {0x03, 0x11, 0x22, 0x02, 0x33};
    CHECK(fwb_cobs_decode(ok, 5, buf, 3) < 0); /* too small an output buffer */
    CHECK(fwb_cobs_encode(ok, 5, buf, 3) == 0);
}

static void sha_case(const uint8_t *msg, size_t len, size_t step, const char *want_hex) {
    uint8_t want[32], got[32];
    unhex(want_hex, want, 32);
    fwb_sha256_ctx c;
    fwb_sha256_init(&c);
    for (size_t at = 0; at < len; at += step) fwb_sha256_update(&c, msg + at, len - at < step ? len - at : step);
    fwb_sha256_final(&c, got);
    CHECK(memcmp(got, want, 32) == 0);
}

static void test_sha256(void) {
    static uint8_t million[1000000];
    sha_case((const uint8_t *)"", 0, 1, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha_case((const uint8_t *)"abc", 3, 1, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha_case((const uint8_t *)m448, strlen(m448), 7,
             "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    memset(million, 'a', sizeof(million));
    sha_case(million, sizeof(million), 4093, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

/* ---- decoder ------------------------------------------------------------------------------ */
static enum fwb_rx_status feed(fwb_rx *rx, const uint8_t *b, size_t n, int *frames) {
    enum fwb_rx_status last = FWB_RX_NONE;
    for (size_t i = 0; i < n; i++) {
        enum fwb_rx_status s = fwb_rx_byte(rx, b[i]);
        if (s == FWB_RX_FRAME) (*frames)++;
        if (s != FWB_RX_NONE) last = s;
    }
    return last;
}

static void test_rx(void) {
    fwb_rx rx;
    uint8_t wire[FWB_MAX_WIRE], junk[400];
    int frames = 0;
    const uint8_t payload[] = {1, 2, 3, 0, 5};
    size_t w = fwb_frame_encode(FWB_T_SAMPLES, 0xBEEF, payload, sizeof(payload), wire, sizeof(wire));
    CHECK(w > 0 && wire[w - 1] == 0);
    fwb_rx_init(&rx);
    CHECK(feed(&rx, wire, w, &frames) == FWB_RX_FRAME);
    CHECK(frames == 1 && rx.frame.type == FWB_T_SAMPLES && rx.frame.seq == 0xBEEF && rx.frame.len == 5 &&
          memcmp(rx.frame.payload, payload, 5) == 0);

    /* oversize run, then the next frame still decodes */
    memset(junk, 0x55, sizeof(junk));
    feed(&rx, junk, sizeof(junk), &frames);
    CHECK(rx.errors[FWB_RX_OVERSIZE] == 1);
    CHECK(feed(&rx, wire, w, &frames) == FWB_RX_NONE); /* the delimiter only ends the discarded run */
    CHECK(feed(&rx, wire, w, &frames) == FWB_RX_FRAME && frames == 2);

    /* bad CRC */
    uint8_t raw[16] = {1, FWB_T_HELLO_REQ, 1, 0, 0, 0};
    uint8_t enc[32];
    size_t e = fwb_cobs_encode(raw, 6, enc, sizeof(enc));
    enc[e++] = 0;
    CHECK(feed(&rx, enc, e, &frames) == FWB_RX_CRC && rx.errors[FWB_RX_CRC] == 1);
    /* short */
    e = fwb_cobs_encode(raw, 3, enc, sizeof(enc));
    enc[e++] = 0;
    CHECK(feed(&rx, enc, e, &frames) == FWB_RX_SHORT);
    /* invalid COBS */
    const uint8_t bad_cobs[] = {0x05, 0x01, 0x00};
    CHECK(feed(&rx, bad_cobs, 3, &frames) == FWB_RX_COBS);
    /* unknown version with a correct CRC */
    raw[0] = 2;
    uint16_t crc = fwb_crc16(raw, 4);
    raw[4] = (uint8_t)crc;
    raw[5] = (uint8_t)(crc >> 8);
    e = fwb_cobs_encode(raw, 6, enc, sizeof(enc));
    enc[e++] = 0;
    CHECK(feed(&rx, enc, e, &frames) == FWB_RX_VERSION);
    /* a frame split over many calls and preceded by empty frames */
    const uint8_t zeros[3] = {0, 0, 0};
    CHECK(feed(&rx, zeros, 3, &frames) == FWB_RX_NONE);
    for (size_t i = 0; i < w; i++) feed(&rx, wire + i, 1, &frames);
    CHECK(frames == 3);
    /* payload too large to encode */
    static uint8_t big[FWB_MAX_PAYLOAD + 1];
    CHECK(fwb_frame_encode(1, 0, big, sizeof(big), wire, sizeof(wire)) == 0);
    CHECK(fwb_frame_encode(1, 0, big, FWB_MAX_PAYLOAD, wire, sizeof(wire)) > 0);
}

/* ---- vectors ------------------------------------------------------------------------------ */
static const char *SIG_HEX =
    "69a88dfcd08dd458ac6448c2340d70ae779d26adfe2411e1f8dd05d251b8e545"
    "1bce0868a13d6305511dad2713151e89d46e46a07510c3094289e60b29875b01";
static const char *RFC_PUB_HEX = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
static const char *RFC_SEED_HEX = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

static void vector_manifest(fwb_manifest *m) {
    memset(m, 0, sizeof(*m));
    strcpy(m->target, "edgetwin-sim-adc3");
    m->version = 0x01030000u;
    m->size = 40000u;
    fwb_sha256_ctx c;
    fwb_sha256_init(&c);
    fwb_sha256_update(&c, (const uint8_t *)"edgetwin test image", 19);
    fwb_sha256_final(&c, m->sha256);
}

static size_t ack_frame(uint16_t seq, uint16_t ack_seq, const uint8_t *body, size_t n, uint8_t *out) {
    uint8_t p[FWB_MAX_PAYLOAD];
    fwb_w w = {p, sizeof(p), 0, 0};
    fwb_w_u16(&w, ack_seq);
    fwb_w_bytes(&w, body, n);
    return fwb_frame_encode(FWB_T_ACK, seq, p, w.len, out, FWB_MAX_WIRE);
}

/* The wire bytes of a named vector, built from its field values with the C codec. */
static size_t build_vector(const char *name, uint8_t *out) {
    uint8_t body[FWB_MAX_PAYLOAD];
    fwb_w w = {body, sizeof(body), 0, 0};
    if (!strcmp(name, "hello")) {
        fwb_hello h = {0x0F, 1000000u, 0x01020003u, 1, FWB_BOOT_TRIAL, FWB_HEALTH_OK, 3, 240, "SIM-0001",
                       "edgetwin-sim-adc3"};
        return fwb_frame_encode(FWB_T_HELLO, 0, body, fwb_hello_encode(&h, body, sizeof(body)), out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "hello_req")) return fwb_frame_encode(FWB_T_HELLO_REQ, 0x1234, NULL, 0, out, FWB_MAX_WIRE);
    if (!strcmp(name, "channel_req")) {
        fwb_w_u8(&w, 2);
        return fwb_frame_encode(FWB_T_CHANNEL_REQ, 0x1235, body, w.len, out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "ack_channel")) {
        fwb_channel c = {2, 0, 250000u, 0.0005f, 0.0f, "vibration", "g"};
        return ack_frame(7, 0x1235, body, fwb_channel_encode(&c, body, sizeof(body)), out);
    }
    if (!strcmp(name, "samples")) {
        fwb_samples s = {0, 4, 1000u, 0xFFFFFF00u, {0, 1, -1, -32768}};
        return fwb_frame_encode(FWB_T_SAMPLES, 8, body, fwb_samples_encode(&s, body, sizeof(body)), out,
                                FWB_MAX_WIRE);
    }
    if (!strcmp(name, "time_sync")) {
        fwb_w_u64(&w, 0x1234567890ull);
        return fwb_frame_encode(FWB_T_TIME_SYNC, 0x1236, body, w.len, out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "ack_time_sync")) {
        fwb_w_u64(&w, 0x1234567890ull);
        fwb_w_u32(&w, 0x89ABCDEFu);
        return ack_frame(9, 0x1236, body, w.len, out);
    }
    if (!strcmp(name, "fw_begin")) {
        fwb_manifest m;
        uint8_t sig[64];
        vector_manifest(&m);
        w.len = fwb_manifest_encode(&m, body, sizeof(body));
        unhex(SIG_HEX, sig, 64);
        fwb_w_bytes(&w, sig, 64);
        return fwb_frame_encode(FWB_T_FW_BEGIN, 0x1237, body, w.len, out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "ack_fw_begin")) {
        fwb_w_u32(&w, 1792);
        fwb_w_u16(&w, 224);
        return ack_frame(10, 0x1237, body, w.len, out);
    }
    if (!strcmp(name, "fw_chunk")) {
        uint8_t data[16];
        for (int i = 0; i < 16; i++) data[i] = (uint8_t)i;
        size_t n = fwb_chunk_encode(1792, data, 16, body, sizeof(body));
        return fwb_frame_encode(FWB_T_FW_CHUNK, 0x1238, body, n, out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "ack_fw_chunk")) {
        fwb_w_u32(&w, 1808);
        return ack_frame(11, 0x1238, body, w.len, out);
    }
    if (!strcmp(name, "nack")) {
        fwb_nack nk = {0x1239, FWB_NACK_BAD_OFFSET, 1808};
        return fwb_frame_encode(FWB_T_NACK, 12, body, fwb_nack_encode(&nk, body, sizeof(body)), out, FWB_MAX_WIRE);
    }
    if (!strcmp(name, "error")) {
        fwb_error er = {FWB_ERR_SELFTEST, 3, "self-test failed"};
        return fwb_frame_encode(FWB_T_ERROR, 13, body, fwb_error_encode(&er, body, sizeof(body)), out,
                                FWB_MAX_WIRE);
    }
    if (!strcmp(name, "fw_verify")) return fwb_frame_encode(FWB_T_FW_VERIFY, 0x123A, NULL, 0, out, FWB_MAX_WIRE);
    if (!strcmp(name, "fw_commit")) return fwb_frame_encode(FWB_T_FW_COMMIT, 0x123B, NULL, 0, out, FWB_MAX_WIRE);
    if (!strcmp(name, "ack_fw_commit")) {
        fwb_w_u32(&w, 0x01030000u);
        return ack_frame(14, 0x123B, body, w.len, out);
    }
    if (!strcmp(name, "fw_abort")) return fwb_frame_encode(FWB_T_FW_ABORT, 0x123C, NULL, 0, out, FWB_MAX_WIRE);
    if (!strcmp(name, "reboot")) {
        fwb_w_u8(&w, 0);
        return fwb_frame_encode(FWB_T_REBOOT, 0x123D, body, w.len, out, FWB_MAX_WIRE);
    }
    return 0;
}

/* Decode a vector's wire bytes and check the fields that matter survive the trip. */
static void check_decoded(const char *name, const uint8_t *wire, size_t n) {
    static fwb_rx rx;
    int frames = 0;
    fwb_rx_init(&rx);
    CHECK(feed(&rx, wire, n, &frames) == FWB_RX_FRAME && frames == 1);
    const fwb_frame *f = &rx.frame;
    if (!strcmp(name, "hello")) {
        fwb_hello h;
        CHECK(fwb_hello_decode(f->payload, f->len, &h) == 0 && h.fw_version == 0x01020003u &&
              !strcmp(h.node_id, "SIM-0001") && !strcmp(h.target, "edgetwin-sim-adc3") && h.n_channels == 3);
    } else if (!strcmp(name, "ack_channel")) {
        fwb_channel c;
        CHECK(f->len > 2 && fwb_channel_decode(f->payload + 2, f->len - 2, &c) == 0 && c.rate_mhz == 250000u &&
              c.scale == 0.0005f && !strcmp(c.name, "vibration") && !strcmp(c.unit, "g"));
    } else if (!strcmp(name, "samples")) {
        fwb_samples s;
        CHECK(fwb_samples_decode(f->payload, f->len, &s) == 0 && s.n == 4 && s.first_index == 1000u &&
              s.first_tick == 0xFFFFFF00u && s.raw[2] == -1 && s.raw[3] == -32768);
    } else if (!strcmp(name, "fw_begin")) {
        fwb_manifest m;
        size_t used = 0;
        CHECK(fwb_manifest_decode(f->payload, f->len, &m, &used) == 0 && f->len - used == 64 &&
              m.version == 0x01030000u && m.size == 40000u);
#ifdef FWB_HAVE_SODIUM
        uint8_t pub[32];
        unhex(RFC_PUB_HEX, pub, 32);
        CHECK(crypto_sign_verify_detached(f->payload + used, f->payload, used, pub) == 0);
#endif
    } else if (!strcmp(name, "nack")) {
        fwb_nack nk;
        CHECK(fwb_nack_decode(f->payload, f->len, &nk) == 0 && nk.code == FWB_NACK_BAD_OFFSET && nk.detail == 1808u);
    } else if (!strcmp(name, "error")) {
        fwb_error er;
        CHECK(fwb_error_decode(f->payload, f->len, &er) == 0 && !strcmp(er.text, "self-test failed"));
    } else if (!strcmp(name, "fw_chunk")) {
        fwb_chunk c;
        CHECK(fwb_chunk_decode(f->payload, f->len, &c) == 0 && c.offset == 1792u && c.len == 16 && c.data[15] == 15);
    }
}

static void test_vectors(const char *path) {
    FILE *fp = fopen(path, "r");
    CHECK(fp != NULL);
    if (!fp) return;
    char line[1024], name[64], hex[900];
    uint8_t want[FWB_MAX_WIRE], got[FWB_MAX_WIRE];
    int count = 0;
    while (fgets(line, sizeof(line), fp)) {
        if (line[0] == '#' || sscanf(line, "%63s %899s", name, hex) != 2) continue;
        size_t n = unhex(hex, want, sizeof(want));
        size_t g = build_vector(name, got);
        if (g != n || memcmp(got, want, n) != 0) fprintf(stderr, "vector %s differs\n", name);
        CHECK(g == n && memcmp(got, want, n) == 0);
        check_decoded(name, want, n);
        count++;
    }
    fclose(fp);
    CHECK(count == 18);
    printf("vectors: %d identical to %s\n", count, path);
}

/* ---- update state machine on a RAM flash -------------------------------------------------- */
#define SLOT 8192u
#include "ram_flash.h"
static const fwb_flash RAM_FLASH = {NULL, ram_read, ram_write, ram_erase};

static uint8_t pubkey[32], seckey[64];

static void image(uint8_t *img, uint32_t len, uint8_t seed) {
    for (uint32_t i = 0; i < len; i++) img[i] = (uint8_t)(i * 31u + seed);
}

static size_t begin_body(uint8_t *body, const char *target, uint32_t version, const uint8_t *img, uint32_t len,
                         int sign_ok) {
    fwb_manifest m;
    memset(&m, 0, sizeof(m));
    strcpy(m.target, target);
    m.version = version;
    m.size = len;
    fwb_sha256_ctx c;
    fwb_sha256_init(&c);
    fwb_sha256_update(&c, img, len);
    fwb_sha256_final(&c, m.sha256);
    size_t n = fwb_manifest_encode(&m, body, FWB_MAX_PAYLOAD);
    memset(body + n, 0, 64);
#ifdef FWB_HAVE_SODIUM
    crypto_sign_detached(body + n, NULL, body, n, seckey);
#endif
    if (!sign_ok) body[n + 5] ^= 0x40;
    return n + 64;
}

/* Send an image in 224-byte chunks from `from`; returns the last result. */
static int send_image(fwb_update *u, const uint8_t *img, uint32_t len, uint32_t from) {
    uint32_t next = from, detail = 0;
    int r = FWB_OK;
    while (next < len && r == FWB_OK) {
        fwb_chunk c = {next, len - next < FWB_MAX_CHUNK ? len - next : FWB_MAX_CHUNK, img + next};
        r = fwb_update_chunk(u, &c, &next, &detail);
    }
    return r;
}

static void test_update(int with_key) {
    static uint8_t img_a[4000], img_b[6000], img_c[5000], body[FWB_MAX_PAYLOAD];
    fwb_update u;
    uint32_t resume = 99, detail = 0;
    const uint8_t *key = with_key ? pubkey : NULL;
    image(img_a, sizeof(img_a), 1);
    image(img_b, sizeof(img_b), 2);
    image(img_c, sizeof(img_c), 3);

    fwb_update_init(&u, &RAM_FLASH, SLOT, "board-x", key);
    memset(ram, 0, sizeof(ram));
    CHECK(fwb_update_boot(&u) == -1); /* blank flash */
    CHECK(fwb_update_format(&u, 0x01000000u, img_a, sizeof(img_a)) == 0);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 0 && fwb_update_boot_state(&u) == FWB_BOOT_CONFIRMED);
    CHECK(u.meta.floor == 0x01000000u);

    /* refusals before anything is written */
    size_t n = begin_body(body, "board-y", 0x01010000u, img_b, sizeof(img_b), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_NACK_WRONG_TARGET);
    n = begin_body(body, "board-x", 0x00090000u, img_b, sizeof(img_b), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_NACK_DOWNGRADE && detail == 0x01000000u);
    static uint8_t huge[SLOT + 1];
    n = begin_body(body, "board-x", 0x01010000u, huge, sizeof(huge), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_NACK_TOO_LARGE && detail == SLOT);
    CHECK(fwb_update_begin(&u, body, 10, &resume, &detail) == FWB_NACK_BAD_REQUEST);
    n = begin_body(body, "board-x", 0x01010000u, img_b, sizeof(img_b), 0);
#ifdef FWB_HAVE_SODIUM
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == (with_key ? FWB_NACK_BAD_SIGNATURE : FWB_OK));
#else
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK); /* hash-only build */
#endif

    /* transfer with a power cut in the middle */
    n = begin_body(body, "board-x", 0x01010000u, img_b, sizeof(img_b), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK);
    uint32_t next = 0;
    fwb_chunk c0 = {0, FWB_MAX_CHUNK, img_b};
    CHECK(fwb_update_chunk(&u, &c0, &next, &detail) == FWB_OK && next == FWB_MAX_CHUNK);
    CHECK(fwb_update_chunk(&u, &c0, &next, &detail) == FWB_OK && next == FWB_MAX_CHUNK); /* retransmission */
    fwb_chunk gap = {2 * FWB_MAX_CHUNK, 16, img_b + 2 * FWB_MAX_CHUNK};
    CHECK(fwb_update_chunk(&u, &gap, &next, &detail) == FWB_NACK_BAD_OFFSET && detail == FWB_MAX_CHUNK);
    fwb_chunk c1 = {FWB_MAX_CHUNK, FWB_MAX_CHUNK, img_b + FWB_MAX_CHUNK};
    CHECK(fwb_update_chunk(&u, &c1, &next, &detail) == FWB_OK && next == 2 * FWB_MAX_CHUNK);
    CHECK(fwb_update_verify(&u, &detail) == FWB_NACK_BAD_STATE && detail == 2 * FWB_MAX_CHUNK);

    fwb_update_init(&u, &RAM_FLASH, SLOT, "board-x", key); /* power cut: everything in RAM is gone */
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 0);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK && resume == 2 * FWB_MAX_CHUNK);
    CHECK(send_image(&u, img_b, sizeof(img_b), resume) == FWB_OK);
    fwb_chunk past = {sizeof(img_b) - 8, 16, img_b};
    CHECK(fwb_update_chunk(&u, &past, &next, &detail) == FWB_NACK_TOO_LARGE);
    CHECK(fwb_update_verify(&u, &detail) == FWB_OK && u.meta.slot[1].state == FWB_SLOT_STAGED);
    CHECK(fwb_update_verify(&u, &detail) == FWB_OK); /* idempotent */
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK && resume == sizeof(img_b));

    /* reboot into the trial, commit only when healthy */
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 1 && fwb_update_boot_state(&u) == FWB_BOOT_TRIAL);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_NACK_BAD_STATE);
    CHECK(fwb_update_abort(&u, &detail) == FWB_NACK_BAD_STATE);
    CHECK(fwb_update_commit(&u, FWB_HEALTH_FAILED, &detail) == FWB_NACK_NOT_HEALTHY);
    CHECK(fwb_update_commit(&u, FWB_HEALTH_OK, &detail) == FWB_OK && detail == 0x01010000u);
    CHECK(u.meta.floor == 0x01010000u && u.meta.slot[1].state == FWB_SLOT_CONFIRMED);
    CHECK(fwb_update_commit(&u, FWB_HEALTH_OK, &detail) == FWB_NACK_BAD_STATE);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 1 && fwb_update_boot_state(&u) == FWB_BOOT_CONFIRMED);
    uint8_t sha[32];
    CHECK(fwb_slot_sha256(&u, 1, sizeof(img_b), sha) == 0 && memcmp(sha, u.meta.slot[1].sha256, 32) == 0);

    /* the old version is now refused */
    n = begin_body(body, "board-x", 0x01000000u, img_a, sizeof(img_a), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_NACK_DOWNGRADE && detail == 0x01010000u);

    /* a trial that is never committed rolls back on the next boot */
    n = begin_body(body, "board-x", 0x01020000u, img_c, sizeof(img_c), 1);
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK && resume == 0);
    CHECK(send_image(&u, img_c, sizeof(img_c), 0) == FWB_OK);
    CHECK(fwb_update_verify(&u, &detail) == FWB_OK);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 0 && fwb_update_boot_state(&u) == FWB_BOOT_TRIAL);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 1 && fwb_update_boot_state(&u) == FWB_BOOT_ROLLED_BACK);
    CHECK(u.meta.slot[0].state == FWB_SLOT_INVALID && u.meta.slot[1].version == 0x01010000u);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.active == 1); /* stays rolled back */

    /* tampered bytes: the hash does not match, the transfer starts over */
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK && resume == 0);
    img_c[100] ^= 1;
    CHECK(send_image(&u, img_c, sizeof(img_c), 0) == FWB_OK);
    CHECK(fwb_update_verify(&u, &detail) == FWB_NACK_HASH_MISMATCH && u.meta.slot[0].state == FWB_SLOT_EMPTY);
    img_c[100] ^= 1;
    CHECK(fwb_update_begin(&u, body, n, &resume, &detail) == FWB_OK && resume == 0);
    CHECK(fwb_update_abort(&u, &detail) == FWB_OK && u.meta.slot[0].state == FWB_SLOT_EMPTY);
    fwb_chunk c2 = {0, 16, img_c};
    CHECK(fwb_update_chunk(&u, &c2, &next, &detail) == FWB_NACK_BAD_STATE);

    /* a torn metadata write: the older copy wins */
    uint32_t counter = u.meta.counter;
    uint32_t newest = (counter & 1u) * FWB_META_SECTOR;
    ram[newest + 20] ^= 0xFF;
    fwb_update_init(&u, &RAM_FLASH, SLOT, "board-x", key);
    CHECK(fwb_update_boot(&u) == 0 && u.meta.counter == counter - 1u);
    ram[newest + 20] ^= 0xFF;
    CHECK(fwb_update_boot(&u) == 0 && u.meta.counter == counter);
    CHECK(fwb_update_caps(&u) & FWB_CAP_FW_UPDATE);
#ifdef FWB_HAVE_SODIUM
    CHECK(((fwb_update_caps(&u) & FWB_CAP_ED25519) != 0) == (with_key != 0));
#endif
}

/* ---- node dispatch ------------------------------------------------------------------------ */
typedef struct {
    uint8_t type[16];
    uint16_t seq[16];
    uint8_t payload[16][FWB_MAX_PAYLOAD];
    size_t len[16];
    int count, reboots;
    uint32_t ticks;
} capture;

static uint32_t cap_ticks(void *ctx) { return ((capture *)ctx)->ticks; }
static void cap_send(void *ctx, const uint8_t *wire, size_t len, uint8_t type, uint16_t seq, const uint8_t *p,
                     size_t plen) {
    capture *c = ctx;
    (void)wire;
    (void)len;
    if (c->count >= 16) return;
    c->type[c->count] = type;
    c->seq[c->count] = seq;
    memcpy(c->payload[c->count], p, plen);
    c->len[c->count] = plen;
    c->count++;
}
static void cap_reboot(void *ctx) { ((capture *)ctx)->reboots++; }

static void request(fwb_node *n, uint8_t type, uint16_t seq, const uint8_t *p, size_t len) {
    uint8_t wire[FWB_MAX_WIRE];
    size_t w = fwb_frame_encode(type, seq, p, len, wire, sizeof(wire));
    fwb_node_rx(n, wire, w);
}

static void test_node(void) {
    static capture cap;
    static fwb_update u;
    static fwb_node node;
    static uint8_t img[3000], body[FWB_MAX_PAYLOAD];
    static const fwb_channel chans[2] = {{0, 0, 500000u, 0.001f, 0.0f, "motor_current", "A"},
                                         {1, 0, 10000u, 0.01f, 0.0f, "winding_temp", "Cel"}};
    memset(&cap, 0, sizeof(cap));
    memset(ram, 0, sizeof(ram));
    image(img, sizeof(img), 9);
    fwb_update_init(&u, &RAM_FLASH, SLOT, "board-x", NULL);
    CHECK(fwb_update_format(&u, 0x01000000u, img, sizeof(img)) == 0 && fwb_update_boot(&u) == 0);
    fwb_node_hal hal = {&cap, cap_ticks, cap_send, cap_reboot};
    fwb_node_init(&node, &hal, &u, "NODE-7", 1000000u, chans, 2);
    node.health = FWB_HEALTH_OK;
    cap.ticks = 0xDEADBEEFu;

    request(&node, FWB_T_HELLO_REQ, 100, NULL, 0);
    fwb_hello h;
    CHECK(cap.count == 1 && cap.type[0] == FWB_T_ACK && cap.payload[0][0] == 100 && cap.payload[0][1] == 0);
    CHECK(fwb_hello_decode(cap.payload[0] + 2, cap.len[0] - 2, &h) == 0 && !strcmp(h.node_id, "NODE-7") &&
          h.n_channels == 2 && h.fw_version == 0x01000000u && h.health == FWB_HEALTH_OK);

    uint8_t ch = 1;
    request(&node, FWB_T_CHANNEL_REQ, 101, &ch, 1);
    fwb_channel c;
    CHECK(cap.count == 2 && fwb_channel_decode(cap.payload[1] + 2, cap.len[1] - 2, &c) == 0 &&
          !strcmp(c.name, "winding_temp"));
    ch = 5;
    request(&node, FWB_T_CHANNEL_REQ, 102, &ch, 1);
    fwb_nack nk;
    CHECK(cap.type[2] == FWB_T_NACK && fwb_nack_decode(cap.payload[2], cap.len[2], &nk) == 0 &&
          nk.code == FWB_NACK_BAD_CHANNEL && nk.detail == 2 && nk.ack_seq == 102);

    uint8_t ts[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    request(&node, FWB_T_TIME_SYNC, 103, ts, 8);
    fwb_r r = {cap.payload[3], cap.len[3], 0, 0};
    CHECK(fwb_r_u16(&r) == 103 && fwb_r_u64(&r) == 0x0807060504030201ull && fwb_r_u32(&r) == 0xDEADBEEFu);

    request(&node, 0x77, 104, NULL, 0);
    CHECK(cap.type[4] == FWB_T_NACK && fwb_nack_decode(cap.payload[4], cap.len[4], &nk) == 0 &&
          nk.code == FWB_NACK_UNKNOWN_TYPE && nk.detail == 0x77);
    request(&node, FWB_T_HELLO, 105, NULL, 0); /* a node-to-gateway type: ignored */
    CHECK(cap.count == 5);
    request(&node, FWB_T_TIME_SYNC, 106, ts, 3); /* malformed */
    CHECK(cap.type[5] == FWB_T_NACK && fwb_nack_decode(cap.payload[5], cap.len[5], &nk) == 0 &&
          nk.code == FWB_NACK_BAD_REQUEST);

    /* update over the wire: a retransmitted chunk is answered from the cache */
    static uint8_t img2[500];
    image(img2, sizeof(img2), 4);
    size_t n = begin_body(body, "board-x", 0x01000001u, img2, sizeof(img2), 1);
    request(&node, FWB_T_FW_BEGIN, 200, body, n);
    CHECK(cap.type[6] == FWB_T_ACK && cap.len[6] == 8);
    n = fwb_chunk_encode(0, img2, FWB_MAX_CHUNK, body, sizeof(body));
    request(&node, FWB_T_FW_CHUNK, 201, body, n);
    request(&node, FWB_T_FW_CHUNK, 201, body, n);
    CHECK(cap.count == 9 && node.duplicates == 1 && cap.len[7] == cap.len[8] &&
          memcmp(cap.payload[7], cap.payload[8], cap.len[7]) == 0 && cap.seq[8] == cap.seq[7] + 1);
    /* garbage before a request is skipped and counted */
    const uint8_t junk[] = {0x13, 0x37, 0x00, 0xFF, 0x00};
    fwb_node_rx(&node, junk, sizeof(junk));
    uint8_t reboot_mode = 0;
    request(&node, FWB_T_REBOOT, 202, &reboot_mode, 1);
    CHECK(cap.count == 10 && cap.type[9] == FWB_T_ACK && cap.reboots == 1);
    CHECK(node.rx.errors[FWB_RX_COBS] + node.rx.errors[FWB_RX_SHORT] == 2);

    fwb_samples s = {1, 2, 7, 9, {10, 20}};
    fwb_node_send_samples(&node, &s);
    CHECK(cap.count == 11 && cap.type[10] == FWB_T_SAMPLES);
}

int main(int argc, char **argv) {
#ifdef FWB_HAVE_SODIUM
    if (sodium_init() < 0) return 1;
    uint8_t seed[32];
    unhex(RFC_SEED_HEX, seed, 32);
    crypto_sign_seed_keypair(pubkey, seckey, seed);
    uint8_t rfc_pub[32];
    unhex(RFC_PUB_HEX, rfc_pub, 32);
    CHECK(memcmp(pubkey, rfc_pub, 32) == 0);
#else
    (void)RFC_SEED_HEX;
    (void)RFC_PUB_HEX;
    (void)seckey;
#endif
    test_crc();
    test_cobs();
    test_sha256();
    test_rx();
    if (argc > 1) {
        test_vectors(argv[1]);
    } else {
        fprintf(stderr, "no vectors file given\n");
        failed++;
    }
    test_update(0);
    test_update(1);
    test_node();
#ifdef FWB_HAVE_SODIUM
    printf("build: libsodium (Ed25519 verified on the node)\n");
#else
    printf("build: hash-only (no Ed25519 on the node)\n");
#endif
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
