/* Framing (COBS + CRC-16/CCITT-FALSE), the stream decoder and message bodies. */
#include <string.h>

#include "fwb.h"

uint16_t fwb_crc16(const uint8_t *data, size_t len) {
    /* Bitwise on purpose: a 512-byte table costs more flash than the cycles it saves at UART speed. */
    uint16_t crc = 0xFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (int b = 0; b < 8; b++) {
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

uint32_t fwb_crc32(const uint8_t *data, size_t len) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        for (int b = 0; b < 8; b++) {
            crc = (crc & 1u) ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
        }
    }
    return ~crc;
}

size_t fwb_cobs_encode(const uint8_t *in, size_t len, uint8_t *out, size_t cap) {
    if (cap == 0) return 0;
    size_t code_at = 0, o = 1;
    uint8_t code = 1;
    for (size_t i = 0; i < len; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        } else {
            if (o >= cap) return 0;
            out[o++] = in[i];
            code++;
            /* A full block of 254 bytes ends without an implied zero; open the next block
             * only if more input follows, so 254 bytes encode to FF + 254 bytes. */
            if (code == 0xFFu && i + 1 < len) {
                out[code_at] = code;
                code_at = o++;
                code = 1;
            }
        }
        if (o > cap) return 0;
    }
    out[code_at] = code;
    return o;
}

long fwb_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t cap) {
    size_t i = 0, o = 0;
    while (i < len) {
        uint8_t code = in[i++];
        if (code == 0) return -1;
        size_t n = (size_t)code - 1u;
        if (n > len - i) return -1;
        if (o + n > cap) return -1;
        for (size_t k = 0; k < n; k++) {
            if (in[i + k] == 0) return -1;
            out[o++] = in[i + k];
        }
        i += n;
        if (code != 0xFFu && i < len) {
            if (o >= cap) return -1;
            out[o++] = 0;
        }
    }
    return (long)o;
}

size_t fwb_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out,
                        size_t cap) {
    uint8_t raw[FWB_MAX_FRAME];
    if (len > FWB_MAX_PAYLOAD) return 0;
    raw[0] = FWB_PROTO_VERSION;
    raw[1] = type;
    raw[2] = (uint8_t)(seq & 0xFFu);
    raw[3] = (uint8_t)(seq >> 8);
    if (len) memcpy(raw + FWB_HEADER_LEN, payload, len);
    uint16_t crc = fwb_crc16(raw, FWB_HEADER_LEN + len);
    raw[FWB_HEADER_LEN + len] = (uint8_t)(crc & 0xFFu);
    raw[FWB_HEADER_LEN + len + 1] = (uint8_t)(crc >> 8);
    if (cap < 1) return 0;
    size_t n = fwb_cobs_encode(raw, FWB_HEADER_LEN + len + FWB_CRC_LEN, out, cap - 1);
    if (n == 0) return 0;
    out[n] = 0;
    return n + 1;
}

void fwb_rx_init(fwb_rx *rx) { memset(rx, 0, sizeof(*rx)); }

static enum fwb_rx_status rx_fail(fwb_rx *rx, enum fwb_rx_status why) {
    rx->errors[why]++;
    return why;
}

enum fwb_rx_status fwb_rx_byte(fwb_rx *rx, uint8_t byte) {
    if (byte != 0) {
        if (rx->discarding) return FWB_RX_NONE;
        if (rx->len >= sizeof(rx->buf)) {
            /* Too long to be a frame: drop everything up to the next delimiter. */
            rx->discarding = 1;
            rx->len = 0;
            return rx_fail(rx, FWB_RX_OVERSIZE);
        }
        rx->buf[rx->len++] = byte;
        return FWB_RX_NONE;
    }
    size_t n = rx->len;
    rx->len = 0;
    if (rx->discarding) {
        rx->discarding = 0;
        return FWB_RX_NONE;
    }
    if (n == 0) return FWB_RX_NONE; /* empty frames are flush markers */
    long m = fwb_cobs_decode(rx->buf, n, rx->frame_buf, sizeof(rx->frame_buf));
    if (m < 0) return rx_fail(rx, FWB_RX_COBS);
    size_t len = (size_t)m;
    if (len < FWB_HEADER_LEN + FWB_CRC_LEN) return rx_fail(rx, FWB_RX_SHORT);
    uint16_t got = (uint16_t)(rx->frame_buf[len - 2] | (rx->frame_buf[len - 1] << 8));
    if (fwb_crc16(rx->frame_buf, len - FWB_CRC_LEN) != got) return rx_fail(rx, FWB_RX_CRC);
    if (rx->frame_buf[0] != FWB_PROTO_VERSION) return rx_fail(rx, FWB_RX_VERSION);
    rx->frame.type = rx->frame_buf[1];
    rx->frame.seq = (uint16_t)(rx->frame_buf[2] | (rx->frame_buf[3] << 8));
    rx->frame.payload = rx->frame_buf + FWB_HEADER_LEN;
    rx->frame.len = len - FWB_HEADER_LEN - FWB_CRC_LEN;
    rx->frames++;
    return FWB_RX_FRAME;
}

/* ---- writer / reader ------------------------------------------------------------------ */
static int w_room(fwb_w *w, size_t n) {
    if (w->err || n > w->cap - w->len) {
        w->err = 1;
        return 0;
    }
    return 1;
}
void fwb_w_u8(fwb_w *w, uint8_t v) {
    if (w_room(w, 1)) w->p[w->len++] = v;
}
void fwb_w_u16(fwb_w *w, uint16_t v) {
    fwb_w_u8(w, (uint8_t)(v & 0xFFu));
    fwb_w_u8(w, (uint8_t)(v >> 8));
}
void fwb_w_u32(fwb_w *w, uint32_t v) {
    fwb_w_u16(w, (uint16_t)(v & 0xFFFFu));
    fwb_w_u16(w, (uint16_t)(v >> 16));
}
void fwb_w_u64(fwb_w *w, uint64_t v) {
    fwb_w_u32(w, (uint32_t)(v & 0xFFFFFFFFu));
    fwb_w_u32(w, (uint32_t)(v >> 32));
}
void fwb_w_f32(fwb_w *w, float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof(u)); /* IEEE 754 binary32 assumed, as on every target we build for */
    fwb_w_u32(w, u);
}
void fwb_w_bytes(fwb_w *w, const uint8_t *b, size_t n) {
    if (n && w_room(w, n)) {
        memcpy(w->p + w->len, b, n);
        w->len += n;
    }
}
void fwb_w_str(fwb_w *w, const char *s, size_t max) {
    size_t n = strlen(s);
    if (n > max) {
        w->err = 1;
        return;
    }
    fwb_w_u8(w, (uint8_t)n);
    fwb_w_bytes(w, (const uint8_t *)s, n);
}

static int r_room(fwb_r *r, size_t n) {
    if (r->err || n > r->len - r->pos) {
        r->err = 1;
        return 0;
    }
    return 1;
}
uint8_t fwb_r_u8(fwb_r *r) { return r_room(r, 1) ? r->p[r->pos++] : 0; }
uint16_t fwb_r_u16(fwb_r *r) {
    uint16_t lo = fwb_r_u8(r);
    return (uint16_t)(lo | ((uint16_t)fwb_r_u8(r) << 8));
}
uint32_t fwb_r_u32(fwb_r *r) {
    uint32_t lo = fwb_r_u16(r);
    return lo | ((uint32_t)fwb_r_u16(r) << 16);
}
uint64_t fwb_r_u64(fwb_r *r) {
    uint64_t lo = fwb_r_u32(r);
    return lo | ((uint64_t)fwb_r_u32(r) << 32);
}
float fwb_r_f32(fwb_r *r) {
    uint32_t u = fwb_r_u32(r);
    float v;
    memcpy(&v, &u, sizeof(v));
    return v;
}
void fwb_r_bytes(fwb_r *r, uint8_t *out, size_t n) {
    if (n && r_room(r, n)) {
        memcpy(out, r->p + r->pos, n);
        r->pos += n;
    }
}
void fwb_r_str(fwb_r *r, char *out, size_t max) {
    size_t n = fwb_r_u8(r);
    out[0] = 0;
    if (r->err) return;
    if (n > max || !r_room(r, n)) {
        r->err = 1;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (r->p[r->pos + i] == 0) { /* a NUL would silently truncate the string */
            r->err = 1;
            return;
        }
        out[i] = (char)r->p[r->pos + i];
    }
    out[n] = 0;
    r->pos += n;
}

static int r_done(const fwb_r *r) { return (r->err || r->pos != r->len) ? -1 : 0; }

/* ---- bodies --------------------------------------------------------------------------- */
size_t fwb_hello_encode(const fwb_hello *m, uint8_t *out, size_t cap) {
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u16(&w, m->caps);
    fwb_w_u32(&w, m->tick_hz);
    fwb_w_u32(&w, m->fw_version);
    fwb_w_u8(&w, m->active_slot);
    fwb_w_u8(&w, m->boot_state);
    fwb_w_u8(&w, m->health);
    fwb_w_u8(&w, m->n_channels);
    fwb_w_u16(&w, m->max_payload);
    fwb_w_str(&w, m->node_id, FWB_MAX_STR);
    fwb_w_str(&w, m->target, FWB_MAX_STR);
    return w.err ? 0 : w.len;
}

int fwb_hello_decode(const uint8_t *in, size_t len, fwb_hello *m) {
    fwb_r r = {in, len, 0, 0};
    m->caps = fwb_r_u16(&r);
    m->tick_hz = fwb_r_u32(&r);
    m->fw_version = fwb_r_u32(&r);
    m->active_slot = fwb_r_u8(&r);
    m->boot_state = fwb_r_u8(&r);
    m->health = fwb_r_u8(&r);
    m->n_channels = fwb_r_u8(&r);
    m->max_payload = fwb_r_u16(&r);
    fwb_r_str(&r, m->node_id, FWB_MAX_STR);
    fwb_r_str(&r, m->target, FWB_MAX_STR);
    return r_done(&r);
}

size_t fwb_channel_encode(const fwb_channel *m, uint8_t *out, size_t cap) {
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u8(&w, m->channel);
    fwb_w_u8(&w, m->format);
    fwb_w_u32(&w, m->rate_mhz);
    fwb_w_f32(&w, m->scale);
    fwb_w_f32(&w, m->offset);
    fwb_w_str(&w, m->name, FWB_MAX_STR);
    fwb_w_str(&w, m->unit, FWB_MAX_UNIT);
    return w.err ? 0 : w.len;
}

int fwb_channel_decode(const uint8_t *in, size_t len, fwb_channel *m) {
    fwb_r r = {in, len, 0, 0};
    m->channel = fwb_r_u8(&r);
    m->format = fwb_r_u8(&r);
    m->rate_mhz = fwb_r_u32(&r);
    m->scale = fwb_r_f32(&r);
    m->offset = fwb_r_f32(&r);
    fwb_r_str(&r, m->name, FWB_MAX_STR);
    fwb_r_str(&r, m->unit, FWB_MAX_UNIT);
    return r_done(&r);
}

size_t fwb_samples_encode(const fwb_samples *m, uint8_t *out, size_t cap) {
    if (m->n == 0 || m->n > FWB_MAX_SAMPLES) return 0;
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u8(&w, m->channel);
    fwb_w_u8(&w, m->n);
    fwb_w_u32(&w, m->first_index);
    fwb_w_u32(&w, m->first_tick);
    for (unsigned i = 0; i < m->n; i++) fwb_w_u16(&w, (uint16_t)m->raw[i]);
    return w.err ? 0 : w.len;
}

int fwb_samples_decode(const uint8_t *in, size_t len, fwb_samples *m) {
    fwb_r r = {in, len, 0, 0};
    m->channel = fwb_r_u8(&r);
    m->n = fwb_r_u8(&r);
    m->first_index = fwb_r_u32(&r);
    m->first_tick = fwb_r_u32(&r);
    if (r.err || m->n == 0 || m->n > FWB_MAX_SAMPLES) return -1;
    for (unsigned i = 0; i < m->n; i++) m->raw[i] = (int16_t)fwb_r_u16(&r);
    return r_done(&r);
}

size_t fwb_nack_encode(const fwb_nack *m, uint8_t *out, size_t cap) {
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u16(&w, m->ack_seq);
    fwb_w_u8(&w, m->code);
    fwb_w_u32(&w, m->detail);
    return w.err ? 0 : w.len;
}

int fwb_nack_decode(const uint8_t *in, size_t len, fwb_nack *m) {
    fwb_r r = {in, len, 0, 0};
    m->ack_seq = fwb_r_u16(&r);
    m->code = fwb_r_u8(&r);
    m->detail = fwb_r_u32(&r);
    return r_done(&r);
}

size_t fwb_error_encode(const fwb_error *m, uint8_t *out, size_t cap) {
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u8(&w, m->code);
    fwb_w_u32(&w, m->detail);
    fwb_w_str(&w, m->text, FWB_MAX_TEXT);
    return w.err ? 0 : w.len;
}

int fwb_error_decode(const uint8_t *in, size_t len, fwb_error *m) {
    fwb_r r = {in, len, 0, 0};
    m->code = fwb_r_u8(&r);
    m->detail = fwb_r_u32(&r);
    fwb_r_str(&r, m->text, FWB_MAX_TEXT);
    return r_done(&r);
}

static const uint8_t MANIFEST_MAGIC[4] = {'E', 'T', 'F', 'M'};

size_t fwb_manifest_encode(const fwb_manifest *m, uint8_t *out, size_t cap) {
    fwb_w w = {out, cap, 0, 0};
    fwb_w_bytes(&w, MANIFEST_MAGIC, 4);
    fwb_w_u8(&w, 1);
    fwb_w_str(&w, m->target, FWB_MAX_STR);
    fwb_w_u32(&w, m->version);
    fwb_w_u32(&w, m->size);
    fwb_w_bytes(&w, m->sha256, FWB_SHA_LEN);
    return w.err ? 0 : w.len;
}

int fwb_manifest_decode(const uint8_t *in, size_t len, fwb_manifest *m, size_t *used) {
    fwb_r r = {in, len, 0, 0};
    uint8_t magic[4] = {0};
    fwb_r_bytes(&r, magic, 4);
    uint8_t format = fwb_r_u8(&r);
    fwb_r_str(&r, m->target, FWB_MAX_STR);
    m->version = fwb_r_u32(&r);
    m->size = fwb_r_u32(&r);
    fwb_r_bytes(&r, m->sha256, FWB_SHA_LEN);
    if (r.err || memcmp(magic, MANIFEST_MAGIC, 4) != 0 || format != 1) return -1;
    *used = r.pos;
    return 0;
}

int fwb_chunk_decode(const uint8_t *in, size_t len, fwb_chunk *m) {
    fwb_r r = {in, len, 0, 0};
    m->offset = fwb_r_u32(&r);
    if (r.err || len - r.pos == 0 || len - r.pos > FWB_MAX_CHUNK) return -1;
    m->len = len - r.pos;
    m->data = in + r.pos;
    return 0;
}

size_t fwb_chunk_encode(uint32_t offset, const uint8_t *data, size_t n, uint8_t *out, size_t cap) {
    if (n == 0 || n > FWB_MAX_CHUNK) return 0;
    fwb_w w = {out, cap, 0, 0};
    fwb_w_u32(&w, offset);
    fwb_w_bytes(&w, data, n);
    return w.err ? 0 : w.len;
}
