/* The node's side of the link: answers the gateway's requests, sends hello/samples/errors. */
#include <string.h>

#include "fwb.h"

void fwb_node_init(fwb_node *n, const fwb_node_hal *hal, fwb_update *upd, const char *node_id,
                   uint32_t tick_hz, const fwb_channel *channels, uint8_t n_channels) {
    memset(n, 0, sizeof(*n));
    n->hal = *hal;
    n->upd = upd;
    size_t len = strlen(node_id);
    if (len > FWB_MAX_STR) len = FWB_MAX_STR;
    memcpy(n->node_id, node_id, len);
    n->tick_hz = tick_hz;
    n->channels = channels;
    n->n_channels = n_channels;
    n->health = FWB_HEALTH_UNKNOWN;
    fwb_rx_init(&n->rx);
}

uint16_t fwb_node_send(fwb_node *n, uint8_t type, const uint8_t *payload, size_t len) {
    uint8_t wire[FWB_MAX_WIRE];
    uint16_t seq = n->tx_seq++;
    size_t w = fwb_frame_encode(type, seq, payload, len, wire, sizeof(wire));
    if (w) n->hal.send(n->hal.ctx, wire, w, type, seq, payload, len);
    return seq;
}

void fwb_node_hello(fwb_node *n, fwb_hello *h) {
    memset(h, 0, sizeof(*h));
    const fwb_meta *m = &n->upd->meta;
    h->caps = fwb_update_caps(n->upd);
    h->tick_hz = n->tick_hz;
    h->fw_version = m->slot[m->active].version;
    h->active_slot = m->active;
    h->boot_state = fwb_update_boot_state(n->upd);
    h->health = n->health;
    h->n_channels = n->n_channels;
    h->max_payload = FWB_MAX_PAYLOAD;
    memcpy(h->node_id, n->node_id, sizeof(h->node_id));
    memcpy(h->target, n->upd->target, sizeof(h->target));
}

void fwb_node_send_hello(fwb_node *n) {
    fwb_hello h;
    uint8_t body[FWB_MAX_PAYLOAD];
    fwb_node_hello(n, &h);
    size_t len = fwb_hello_encode(&h, body, sizeof(body));
    if (len) fwb_node_send(n, FWB_T_HELLO, body, len);
}

void fwb_node_send_samples(fwb_node *n, const fwb_samples *s) {
    uint8_t body[FWB_MAX_PAYLOAD];
    size_t len = fwb_samples_encode(s, body, sizeof(body));
    if (len) fwb_node_send(n, FWB_T_SAMPLES, body, len);
}

void fwb_node_send_error(fwb_node *n, uint8_t code, uint32_t detail, const char *text) {
    fwb_error e;
    uint8_t body[FWB_MAX_PAYLOAD];
    memset(&e, 0, sizeof(e));
    e.code = code;
    e.detail = detail;
    size_t len = strlen(text);
    if (len > FWB_MAX_TEXT) len = FWB_MAX_TEXT;
    memcpy(e.text, text, len);
    size_t b = fwb_error_encode(&e, body, sizeof(body));
    if (b) fwb_node_send(n, FWB_T_ERROR, body, b);
}

/* Requests with side effects are answered from the cache when retransmitted. */
static int cached_type(uint8_t type) {
    return type == FWB_T_FW_BEGIN || type == FWB_T_FW_CHUNK || type == FWB_T_FW_VERIFY ||
           type == FWB_T_FW_COMMIT || type == FWB_T_FW_ABORT || type == FWB_T_REBOOT;
}

/* Everything except the node-to-gateway types is a request (unknown ones get a NACK). */
static int is_request(uint8_t type) {
    return !(type == FWB_T_HELLO || type == FWB_T_SAMPLES || type == FWB_T_ACK || type == FWB_T_NACK ||
             type == FWB_T_ERROR);
}

static void handle(fwb_node *n, const fwb_frame *f) {
    uint8_t body[FWB_MAX_PAYLOAD];
    fwb_w w = {body, sizeof(body), 0, 0};
    fwb_r r = {f->payload, f->len, 0, 0};
    uint32_t detail = 0, v32 = 0;
    int code = FWB_OK;
    int reboot = 0;

    if (!is_request(f->type)) return; /* node-to-gateway types looped back: not for us */
    n->requests++;
    if (cached_type(f->type) && n->have_last && f->seq == n->last_seq && f->type == n->last_type) {
        n->duplicates++;
        fwb_node_send(n, n->last_resp_type, n->last_resp, n->last_resp_len);
        return;
    }
    fwb_w_u16(&w, f->seq);
    switch (f->type) {
    case FWB_T_HELLO_REQ: {
        fwb_hello h;
        if (f->len != 0) {
            code = FWB_NACK_BAD_REQUEST;
            break;
        }
        fwb_node_hello(n, &h);
        w.len += fwb_hello_encode(&h, body + w.len, sizeof(body) - w.len);
        break;
    }
    case FWB_T_CHANNEL_REQ: {
        uint8_t ch = fwb_r_u8(&r);
        if (r.err || f->len != 1) {
            code = FWB_NACK_BAD_REQUEST;
        } else if (ch >= n->n_channels) {
            code = FWB_NACK_BAD_CHANNEL;
            detail = n->n_channels;
        } else {
            w.len += fwb_channel_encode(&n->channels[ch], body + w.len, sizeof(body) - w.len);
        }
        break;
    }
    case FWB_T_TIME_SYNC: {
        uint64_t gw_us = fwb_r_u64(&r);
        if (r.err || f->len != 8) {
            code = FWB_NACK_BAD_REQUEST;
            break;
        }
        fwb_w_u64(&w, gw_us);
        fwb_w_u32(&w, n->hal.ticks(n->hal.ctx));
        break;
    }
    case FWB_T_FW_BEGIN: {
        uint32_t resume = 0;
        code = fwb_update_begin(n->upd, f->payload, f->len, &resume, &detail);
        fwb_w_u32(&w, resume);
        fwb_w_u16(&w, (uint16_t)FWB_MAX_CHUNK);
        break;
    }
    case FWB_T_FW_CHUNK: {
        fwb_chunk c;
        if (fwb_chunk_decode(f->payload, f->len, &c) != 0) {
            code = FWB_NACK_BAD_REQUEST;
            break;
        }
        code = fwb_update_chunk(n->upd, &c, &v32, &detail);
        fwb_w_u32(&w, v32);
        break;
    }
    case FWB_T_FW_VERIFY:
        code = f->len ? FWB_NACK_BAD_REQUEST : fwb_update_verify(n->upd, &detail);
        break;
    case FWB_T_FW_COMMIT:
        code = f->len ? FWB_NACK_BAD_REQUEST : fwb_update_commit(n->upd, n->health, &detail);
        if (code == FWB_OK) fwb_w_u32(&w, detail);
        break;
    case FWB_T_FW_ABORT:
        code = f->len ? FWB_NACK_BAD_REQUEST : fwb_update_abort(n->upd, &detail);
        break;
    case FWB_T_REBOOT:
        if (f->len != 1) {
            code = FWB_NACK_BAD_REQUEST;
        } else {
            reboot = 1;
        }
        break;
    default:
        code = FWB_NACK_UNKNOWN_TYPE;
        detail = f->type;
        break;
    }
    uint8_t resp_type = FWB_T_ACK;
    if (code != FWB_OK) {
        fwb_nack nk = {f->seq, (uint8_t)code, detail};
        w.len = fwb_nack_encode(&nk, body, sizeof(body));
        resp_type = FWB_T_NACK;
    }
    if (cached_type(f->type)) {
        n->have_last = 1;
        n->last_seq = f->seq;
        n->last_type = f->type;
        n->last_resp_type = resp_type;
        memcpy(n->last_resp, body, w.len);
        n->last_resp_len = w.len;
    }
    fwb_node_send(n, resp_type, body, w.len);
    if (reboot && n->hal.reboot) n->hal.reboot(n->hal.ctx);
}

void fwb_node_rx(fwb_node *n, const uint8_t *bytes, size_t len) {
    for (size_t i = 0; i < len; i++) {
        if (fwb_rx_byte(&n->rx, bytes[i]) == FWB_RX_FRAME) handle(n, &n->rx.frame);
    }
}
