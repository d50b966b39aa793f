/*
 * fwb - the node side of the edgetwin firmware bridge (see ../PROTOCOL.md).
 *
 * Portable C99, no dynamic allocation, no I/O: the platform supplies a byte sink, a tick
 * counter and a flash driver through small function tables.  Every buffer is sized by the
 * constants below, so the worst-case RAM use is known at compile time.
 *
 * Build flags:
 *   FWB_HAVE_SODIUM  verify Ed25519 manifest signatures with libsodium (else hash-only).
 */
#ifndef FWB_H
#define FWB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- sizes ---------------------------------------------------------------------------- */
#define FWB_PROTO_VERSION 1u
#define FWB_HEADER_LEN 4u   /* version, type, seq (u16 LE) */
#define FWB_CRC_LEN 2u      /* CRC-16/CCITT-FALSE, LE */
#define FWB_MAX_PAYLOAD 240u
#define FWB_MAX_FRAME (FWB_HEADER_LEN + FWB_MAX_PAYLOAD + FWB_CRC_LEN) /* 246 */
/* COBS adds one byte per 254 and one leading code byte; the delimiter is extra. */
#define FWB_MAX_COBS (FWB_MAX_FRAME + FWB_MAX_FRAME / 254u + 1u) /* 247 */
#define FWB_MAX_WIRE (FWB_MAX_COBS + 1u)                         /* 248 with the delimiter */
#define FWB_MAX_STR 32u
#define FWB_MAX_UNIT 16u
#define FWB_MAX_TEXT 64u
#define FWB_MAX_SAMPLES 115u /* (240 - 10) / 2 */
#define FWB_MAX_CHUNK 224u   /* 240 - 4 (offset) rounded down to a multiple of 16 */
#define FWB_SIG_LEN 64u
#define FWB_SHA_LEN 32u
#define FWB_MAX_MANIFEST (4u + 1u + 1u + FWB_MAX_STR + 4u + 4u + FWB_SHA_LEN) /* 78 */
#define FWB_SAMPLE_INVALID (-32768) /* raw value meaning "no valid sample" */

/* ---- message types -------------------------------------------------------------------- */
enum fwb_type {
    FWB_T_HELLO = 0x01,
    FWB_T_HELLO_REQ = 0x02,
    FWB_T_CHANNEL_REQ = 0x03,
    FWB_T_SAMPLES = 0x10,
    FWB_T_ACK = 0x20,
    FWB_T_NACK = 0x21,
    FWB_T_ERROR = 0x22,
    FWB_T_TIME_SYNC = 0x30,
    FWB_T_FW_BEGIN = 0x40,
    FWB_T_FW_CHUNK = 0x41,
    FWB_T_FW_VERIFY = 0x42,
    FWB_T_FW_COMMIT = 0x43,
    FWB_T_FW_ABORT = 0x44,
    FWB_T_REBOOT = 0x50
};

enum fwb_caps {
    FWB_CAP_SAMPLES = 1u << 0,
    FWB_CAP_TIME_SYNC = 1u << 1,
    FWB_CAP_FW_UPDATE = 1u << 2,
    FWB_CAP_ED25519 = 1u << 3
};

enum fwb_boot_state { FWB_BOOT_CONFIRMED = 0, FWB_BOOT_TRIAL = 1, FWB_BOOT_ROLLED_BACK = 2 };
enum fwb_health { FWB_HEALTH_UNKNOWN = 0, FWB_HEALTH_OK = 1, FWB_HEALTH_FAILED = 2 };

/* NACK codes: why a request was refused. */
enum fwb_nack_code {
    FWB_OK = 0,
    FWB_NACK_BAD_REQUEST = 1,
    FWB_NACK_UNKNOWN_TYPE = 2,
    FWB_NACK_BAD_STATE = 3,
    FWB_NACK_BAD_OFFSET = 4,
    FWB_NACK_TOO_LARGE = 5,
    FWB_NACK_WRONG_TARGET = 6,
    FWB_NACK_DOWNGRADE = 7,
    FWB_NACK_BAD_SIGNATURE = 8,
    FWB_NACK_HASH_MISMATCH = 9,
    FWB_NACK_FLASH = 10,
    FWB_NACK_BAD_CHANNEL = 11,
    FWB_NACK_NOT_HEALTHY = 12
};

enum fwb_error_code { FWB_ERR_SELFTEST = 1, FWB_ERR_OVERRUN = 2, FWB_ERR_TX_FULL = 3 };

/* Why a received frame was dropped (counted per reason by the decoder). */
enum fwb_rx_status {
    FWB_RX_NONE = 0,     /* no complete frame yet */
    FWB_RX_FRAME = 1,    /* a valid frame is in rx->frame */
    FWB_RX_OVERSIZE = 2, /* more than FWB_MAX_COBS bytes without a delimiter */
    FWB_RX_COBS = 3,     /* the COBS encoding is invalid */
    FWB_RX_SHORT = 4,    /* shorter than a header and CRC */
    FWB_RX_CRC = 5,      /* CRC mismatch */
    FWB_RX_VERSION = 6,  /* unknown protocol version */
    FWB_RX_REASONS = 7
};

/* ---- checksums and hashing ------------------------------------------------------------ */
uint16_t fwb_crc16(const uint8_t *data, size_t len);
uint32_t fwb_crc32(const uint8_t *data, size_t len);

typedef struct {
    uint32_t h[8];
    uint64_t total;
    uint8_t block[64];
    size_t used;
} fwb_sha256_ctx;
void fwb_sha256_init(fwb_sha256_ctx *c);
void fwb_sha256_update(fwb_sha256_ctx *c, const uint8_t *data, size_t len);
void fwb_sha256_final(fwb_sha256_ctx *c, uint8_t out[FWB_SHA_LEN]);

/* ---- COBS ----------------------------------------------------------------------------- */
/* Encoded length (no delimiter), or 0 when cap is too small. */
size_t fwb_cobs_encode(const uint8_t *in, size_t len, uint8_t *out, size_t cap);
/* Decoded length, or -1 when the input is not valid COBS or cap is too small. */
long fwb_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap);

/* ---- frames --------------------------------------------------------------------------- */
/* The wire bytes of one frame: COBS(version type seq payload crc) then 0x00; 0 on error. */
size_t fwb_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out,
                        size_t cap);

typedef struct {
    uint8_t type;
    uint16_t seq;
    const uint8_t *payload; /* points into the decoder's buffer: valid until the next byte */
    size_t len;
} fwb_frame;

/* Stream decoder: feed bytes one at a time; resynchronises on the next 0x00 after any error. */
typedef struct {
    uint8_t buf[FWB_MAX_COBS];
    uint8_t frame_buf[FWB_MAX_FRAME];
    size_t len;
    uint8_t discarding;
    fwb_frame frame;
    uint32_t frames;
    uint32_t errors[FWB_RX_REASONS];
} fwb_rx;
void fwb_rx_init(fwb_rx *rx);
enum fwb_rx_status fwb_rx_byte(fwb_rx *rx, uint8_t byte);

/* ---- byte writer/reader (little-endian) ----------------------------------------------- */
typedef struct {
    uint8_t *p;
    size_t cap, len;
    int err;
} fwb_w;
typedef struct {
    const uint8_t *p;
    size_t len, pos;
    int err;
} fwb_r;
void fwb_w_u8(fwb_w *w, uint8_t v);
void fwb_w_u16(fwb_w *w, uint16_t v);
void fwb_w_u32(fwb_w *w, uint32_t v);
void fwb_w_u64(fwb_w *w, uint64_t v);
void fwb_w_f32(fwb_w *w, float v);
void fwb_w_bytes(fwb_w *w, const uint8_t *b, size_t n);
void fwb_w_str(fwb_w *w, const char *s, size_t max);
uint8_t fwb_r_u8(fwb_r *r);
uint16_t fwb_r_u16(fwb_r *r);
uint32_t fwb_r_u32(fwb_r *r);
uint64_t fwb_r_u64(fwb_r *r);
float fwb_r_f32(fwb_r *r);
void fwb_r_bytes(fwb_r *r, uint8_t *out, size_t n);
void fwb_r_str(fwb_r *r, char *out, size_t max);

/* ---- message bodies ------------------------------------------------------------------- */
typedef struct {
    uint16_t caps;
    uint32_t tick_hz;
    uint32_t fw_version;
    uint8_t active_slot, boot_state, health, n_channels;
    uint16_t max_payload;
    char node_id[FWB_MAX_STR + 1];
    char target[FWB_MAX_STR + 1];
} fwb_hello;

typedef struct {
    uint8_t channel, format; /* format 0: int16 raw, value = raw * scale + offset */
    uint32_t rate_mhz;       /* sample rate in millihertz */
    float scale, offset;
    char name[FWB_MAX_STR + 1];
    char unit[FWB_MAX_UNIT + 1];
} fwb_channel;

typedef struct {
    uint8_t channel, n;
    uint32_t first_index, first_tick;
    int16_t raw[FWB_MAX_SAMPLES];
} fwb_samples;

typedef struct {
    uint16_t ack_seq;
    uint8_t code;
    uint32_t detail;
} fwb_nack;

typedef struct {
    uint8_t code;
    uint32_t detail;
    char text[FWB_MAX_TEXT + 1];
} fwb_error;

typedef struct {
    char target[FWB_MAX_STR + 1];
    uint32_t version, size;
    uint8_t sha256[FWB_SHA_LEN];
} fwb_manifest;

typedef struct {
    uint32_t offset;
    size_t len;
    const uint8_t *data; /* points into the frame */
} fwb_chunk;

/* Encoders return the body length (0 when it does not fit); decoders return 0 or -1. */
size_t fwb_hello_encode(const fwb_hello *m, uint8_t *out, size_t cap);
int fwb_hello_decode(const uint8_t *in, size_t len, fwb_hello *m);
size_t fwb_channel_encode(const fwb_channel *m, uint8_t *out, size_t cap);
int fwb_channel_decode(const uint8_t *in, size_t len, fwb_channel *m);
size_t fwb_samples_encode(const fwb_samples *m, uint8_t *out, size_t cap);
int fwb_samples_decode(const uint8_t *in, size_t len, fwb_samples *m);
size_t fwb_nack_encode(const fwb_nack *m, uint8_t *out, size_t cap);
int fwb_nack_decode(const uint8_t *in, size_t len, fwb_nack *m);
size_t fwb_error_encode(const fwb_error *m, uint8_t *out, size_t cap);
int fwb_error_decode(const uint8_t *in, size_t len, fwb_error *m);
size_t fwb_manifest_encode(const fwb_manifest *m, uint8_t *out, size_t cap);
/* Decodes a manifest at the start of in; *used gets its length. */
int fwb_manifest_decode(const uint8_t *in, size_t len, fwb_manifest *m, size_t *used);
int fwb_chunk_decode(const uint8_t *in, size_t len, fwb_chunk *m);
size_t fwb_chunk_encode(uint32_t offset, const uint8_t *data, size_t n, uint8_t *out, size_t cap);

/* ---- firmware update: A/B slots in flash ---------------------------------------------- */
typedef struct {
    void *ctx;
    int (*read)(void *ctx, uint32_t addr, uint8_t *out, uint32_t len);
    int (*write)(void *ctx, uint32_t addr, const uint8_t *data, uint32_t len);
    int (*erase)(void *ctx, uint32_t addr, uint32_t len);
} fwb_flash;

enum fwb_slot_state {
    FWB_SLOT_EMPTY = 0,
    FWB_SLOT_RECEIVING = 1,
    FWB_SLOT_STAGED = 2, /* verified, boots in trial on the next reboot */
    FWB_SLOT_TRIAL = 3,  /* running, not yet committed */
    FWB_SLOT_CONFIRMED = 4,
    FWB_SLOT_INVALID = 5 /* rolled back */
};

typedef struct {
    uint8_t state;
    uint32_t version, size, progress;
    uint8_t sha256[FWB_SHA_LEN];
} fwb_slot;

#define FWB_META_SECTOR 4096u
#define FWB_META_LEN 112u
#define FWB_FLAG_ROLLED_BACK 1u

typedef struct {
    uint32_t counter;
    uint8_t active, flags;
    uint32_t floor; /* anti-rollback: the lowest version accepted */
    fwb_slot slot[2];
} fwb_meta;

typedef struct {
    fwb_flash flash;
    uint32_t slot_size;
    char target[FWB_MAX_STR + 1];
    const uint8_t *pubkey; /* 32 bytes, or NULL: hash-only */
    fwb_meta meta;
} fwb_update;

/* Flash layout: two metadata sectors, then slot A, then slot B. */
uint32_t fwb_flash_size(uint32_t slot_size);
uint32_t fwb_slot_addr(const fwb_update *u, uint8_t slot);
void fwb_update_init(fwb_update *u, const fwb_flash *flash, uint32_t slot_size, const char *target,
                     const uint8_t *pubkey);
/* Write a factory image into slot A as the confirmed image; erases everything else. */
int fwb_update_format(fwb_update *u, uint32_t version, const uint8_t *image, uint32_t len);
/* Load the metadata and choose the slot to run (trial of a staged slot, rollback of an
 * uncommitted trial).  Returns 0, or -1 when the flash holds no valid metadata. */
int fwb_update_boot(fwb_update *u);
uint8_t fwb_update_boot_state(const fwb_update *u);
uint16_t fwb_update_caps(const fwb_update *u);
/* The update requests; each returns FWB_OK or a NACK code with *detail set. */
int fwb_update_begin(fwb_update *u, const uint8_t *body, size_t len, uint32_t *resume, uint32_t *detail);
int fwb_update_chunk(fwb_update *u, const fwb_chunk *c, uint32_t *next, uint32_t *detail);
int fwb_update_verify(fwb_update *u, uint32_t *detail);
int fwb_update_commit(fwb_update *u, uint8_t health, uint32_t *detail);
int fwb_update_abort(fwb_update *u, uint32_t *detail);
/* SHA-256 of the first len bytes of a slot. */
int fwb_slot_sha256(const fwb_update *u, uint8_t slot, uint32_t len, uint8_t out[FWB_SHA_LEN]);

/* ---- node: request dispatch ----------------------------------------------------------- */
typedef struct {
    void *ctx;
    uint32_t (*ticks)(void *ctx);
    void (*send)(void *ctx, const uint8_t *wire, size_t len, uint8_t type, uint16_t seq,
                 const uint8_t *payload, size_t plen);
    void (*reboot)(void *ctx); /* called after the ACK of a REBOOT request was sent */
} fwb_node_hal;

typedef struct {
    fwb_node_hal hal;
    fwb_update *upd;
    const fwb_channel *channels;
    uint8_t n_channels;
    char node_id[FWB_MAX_STR + 1];
    uint32_t tick_hz;
    uint8_t health;
    uint16_t tx_seq;
    fwb_rx rx;
    /* the last request and its response, so a retransmitted request is answered, not redone */
    uint8_t have_last, last_type, last_resp_type;
    uint16_t last_seq;
    uint8_t last_resp[FWB_MAX_PAYLOAD];
    size_t last_resp_len;
    uint32_t requests, duplicates;
} fwb_node;

void fwb_node_init(fwb_node *n, const fwb_node_hal *hal, fwb_update *upd, const char *node_id,
                   uint32_t tick_hz, const fwb_channel *channels, uint8_t n_channels);
void fwb_node_rx(fwb_node *n, const uint8_t *bytes, size_t len);
/* Send one message; returns the sequence number used. */
uint16_t fwb_node_send(fwb_node *n, uint8_t type, const uint8_t *payload, size_t len);
void fwb_node_hello(fwb_node *n, fwb_hello *out);
void fwb_node_send_hello(fwb_node *n);
void fwb_node_send_samples(fwb_node *n, const fwb_samples *s);
void fwb_node_send_error(fwb_node *n, uint8_t code, uint32_t detail, const char *text);

#ifdef __cplusplus
}
#endif
#endif
