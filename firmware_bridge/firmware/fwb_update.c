/*
 * Firmware update state machine with A/B slots.
 *
 * Flash: two metadata sectors (written alternately, each with a counter and a CRC-32, so a
 * power cut while writing one leaves the other intact), then slot A and slot B.
 *
 *   begin (manifest + signature) -> RECEIVING, resumable at `progress`
 *   chunk ...                      progress persisted after every accepted chunk
 *   verify (sha256 of the slot)    -> STAGED
 *   reboot                         the boot code turns STAGED into TRIAL and runs it
 *   commit (node healthy)          -> CONFIRMED, anti-rollback floor raised
 *   any reboot while TRIAL         -> INVALID, back to the previous CONFIRMED slot
 */
#include <string.h>

#include "fwb.h"

#ifdef FWB_HAVE_SODIUM
#include <sodium.h>
#endif

#define META_MAGIC 0x4D425746u /* "FWBM" little-endian */
#define SLOT_BYTES 45u

uint32_t fwb_flash_size(uint32_t slot_size) { return 2u * FWB_META_SECTOR + 2u * slot_size; }

uint32_t fwb_slot_addr(const fwb_update *u, uint8_t slot) {
    return 2u * FWB_META_SECTOR + (uint32_t)slot * u->slot_size;
}

static void meta_pack(const fwb_meta *m, uint8_t out[FWB_META_LEN]) {
    fwb_w w = {out, FWB_META_LEN, 0, 0};
    fwb_w_u32(&w, META_MAGIC);
    fwb_w_u32(&w, m->counter);
    fwb_w_u8(&w, m->active);
    fwb_w_u8(&w, m->flags);
    fwb_w_u32(&w, m->floor);
    for (unsigned s = 0; s < 2; s++) {
        fwb_w_u8(&w, m->slot[s].state);
        fwb_w_u32(&w, m->slot[s].version);
        fwb_w_u32(&w, m->slot[s].size);
        fwb_w_u32(&w, m->slot[s].progress);
        fwb_w_bytes(&w, m->slot[s].sha256, FWB_SHA_LEN);
    }
    fwb_w_u32(&w, 0); /* reserved */
    fwb_w_u32(&w, fwb_crc32(out, FWB_META_LEN - 4u));
}

static int meta_unpack(const uint8_t in[FWB_META_LEN], fwb_meta *m) {
    fwb_r r = {in, FWB_META_LEN, 0, 0};
    if (fwb_r_u32(&r) != META_MAGIC) return -1;
    m->counter = fwb_r_u32(&r);
    m->active = fwb_r_u8(&r);
    m->flags = fwb_r_u8(&r);
    m->floor = fwb_r_u32(&r);
    for (unsigned s = 0; s < 2; s++) {
        m->slot[s].state = fwb_r_u8(&r);
        m->slot[s].version = fwb_r_u32(&r);
        m->slot[s].size = fwb_r_u32(&r);
        m->slot[s].progress = fwb_r_u32(&r);
        fwb_r_bytes(&r, m->slot[s].sha256, FWB_SHA_LEN);
    }
    (void)fwb_r_u32(&r);
    uint32_t crc = fwb_r_u32(&r);
    if (r.err || crc != fwb_crc32(in, FWB_META_LEN - 4u) || m->active > 1u) return -1;
    return 0;
}

static int meta_save(fwb_update *u) {
    uint8_t buf[FWB_META_LEN];
    u->meta.counter++;
    meta_pack(&u->meta, buf);
    uint32_t addr = (u->meta.counter & 1u) * FWB_META_SECTOR;
    if (u->flash.erase(u->flash.ctx, addr, FWB_META_SECTOR) != 0) return -1;
    return u->flash.write(u->flash.ctx, addr, buf, FWB_META_LEN);
}

void fwb_update_init(fwb_update *u, const fwb_flash *flash, uint32_t slot_size, const char *target,
                     const uint8_t *pubkey) {
    memset(u, 0, sizeof(*u));
    u->flash = *flash;
    u->slot_size = slot_size;
    size_t n = strlen(target);
    if (n > FWB_MAX_STR) n = FWB_MAX_STR;
    memcpy(u->target, target, n);
    u->target[n] = 0;
    u->pubkey = pubkey;
}

int fwb_slot_sha256(const fwb_update *u, uint8_t slot, uint32_t len, uint8_t out[FWB_SHA_LEN]) {
    uint8_t buf[256];
    fwb_sha256_ctx c;
    fwb_sha256_init(&c);
    uint32_t base = fwb_slot_addr(u, slot);
    for (uint32_t at = 0; at < len;) {
        uint32_t n = len - at < sizeof(buf) ? len - at : (uint32_t)sizeof(buf);
        if (u->flash.read(u->flash.ctx, base + at, buf, n) != 0) return -1;
        fwb_sha256_update(&c, buf, n);
        at += n;
    }
    fwb_sha256_final(&c, out);
    return 0;
}

int fwb_update_format(fwb_update *u, uint32_t version, const uint8_t *image, uint32_t len) {
    if (len == 0 || len > u->slot_size) return -1;
    if (u->flash.erase(u->flash.ctx, 0, fwb_flash_size(u->slot_size)) != 0) return -1;
    if (u->flash.write(u->flash.ctx, fwb_slot_addr(u, 0), image, len) != 0) return -1;
    memset(&u->meta, 0, sizeof(u->meta));
    u->meta.floor = version;
    fwb_slot *a = &u->meta.slot[0];
    a->state = FWB_SLOT_CONFIRMED;
    a->version = version;
    a->size = len;
    a->progress = len;
    if (fwb_slot_sha256(u, 0, len, a->sha256) != 0) return -1;
    return meta_save(u);
}

int fwb_update_boot(fwb_update *u) {
    uint8_t buf[FWB_META_LEN];
    fwb_meta copies[2];
    int ok[2] = {0, 0};
    for (unsigned i = 0; i < 2; i++) {
        if (u->flash.read(u->flash.ctx, i * FWB_META_SECTOR, buf, FWB_META_LEN) == 0) {
            ok[i] = meta_unpack(buf, &copies[i]) == 0;
        }
    }
    if (!ok[0] && !ok[1]) return -1;
    unsigned pick = (ok[0] && (!ok[1] || copies[0].counter > copies[1].counter)) ? 0u : 1u;
    u->meta = copies[pick];
    fwb_meta *m = &u->meta;
    uint8_t other = (uint8_t)(1u - m->active);
    if (m->slot[m->active].state == FWB_SLOT_TRIAL && m->slot[other].state == FWB_SLOT_CONFIRMED) {
        /* Rebooted before the trial image was committed: it never proved healthy. */
        m->slot[m->active].state = FWB_SLOT_INVALID;
        m->active = other;
        m->flags |= FWB_FLAG_ROLLED_BACK;
        return meta_save(u) == 0 ? 0 : -1;
    }
    if (m->slot[other].state == FWB_SLOT_STAGED) {
        m->slot[other].state = FWB_SLOT_TRIAL;
        m->active = other;
        m->flags &= (uint8_t)~FWB_FLAG_ROLLED_BACK;
        return meta_save(u) == 0 ? 0 : -1;
    }
    return 0;
}

uint8_t fwb_update_boot_state(const fwb_update *u) {
    if (u->meta.slot[u->meta.active].state == FWB_SLOT_TRIAL) return FWB_BOOT_TRIAL;
    return (u->meta.flags & FWB_FLAG_ROLLED_BACK) ? FWB_BOOT_ROLLED_BACK : FWB_BOOT_CONFIRMED;
}

uint16_t fwb_update_caps(const fwb_update *u) {
    uint16_t caps = FWB_CAP_SAMPLES | FWB_CAP_TIME_SYNC | FWB_CAP_FW_UPDATE;
#ifdef FWB_HAVE_SODIUM
    if (u->pubkey) caps |= FWB_CAP_ED25519;
#else
    (void)u;
#endif
    return caps;
}

static int signature_ok(const fwb_update *u, const uint8_t *msg, size_t len, const uint8_t *sig) {
#ifdef FWB_HAVE_SODIUM
    if (!u->pubkey) return 1;
    return crypto_sign_verify_detached(sig, msg, len, u->pubkey) == 0;
#else
    /* No vetted Ed25519 in this build: the image hash (checked at verify) is the node's guard;
     * the gateway checks the signature before sending. */
    (void)u;
    (void)msg;
    (void)len;
    (void)sig;
    return 1;
#endif
}

int fwb_update_begin(fwb_update *u, const uint8_t *body, size_t len, uint32_t *resume, uint32_t *detail) {
    fwb_manifest man;
    size_t used = 0;
    *detail = 0;
    if (fwb_manifest_decode(body, len, &man, &used) != 0 || len - used != FWB_SIG_LEN) {
        return FWB_NACK_BAD_REQUEST;
    }
    fwb_meta *m = &u->meta;
    uint8_t t = (uint8_t)(1u - m->active);
    if (strcmp(man.target, u->target) != 0) return FWB_NACK_WRONG_TARGET;
    if (man.version < m->floor) {
        *detail = m->floor;
        return FWB_NACK_DOWNGRADE;
    }
    if (man.size == 0) return FWB_NACK_BAD_REQUEST;
    if (man.size > u->slot_size) {
        *detail = u->slot_size;
        return FWB_NACK_TOO_LARGE;
    }
    if (m->slot[m->active].state == FWB_SLOT_TRIAL) return FWB_NACK_BAD_STATE;
    if (!signature_ok(u, body, used, body + used)) return FWB_NACK_BAD_SIGNATURE;
    fwb_slot *s = &m->slot[t];
    if ((s->state == FWB_SLOT_RECEIVING || s->state == FWB_SLOT_STAGED) && s->version == man.version &&
        s->size == man.size && memcmp(s->sha256, man.sha256, FWB_SHA_LEN) == 0) {
        *resume = s->progress; /* the same image: carry on where the last transfer stopped */
        return FWB_OK;
    }
    if (u->flash.erase(u->flash.ctx, fwb_slot_addr(u, t), u->slot_size) != 0) return FWB_NACK_FLASH;
    s->state = FWB_SLOT_RECEIVING;
    s->version = man.version;
    s->size = man.size;
    s->progress = 0;
    memcpy(s->sha256, man.sha256, FWB_SHA_LEN);
    m->flags &= (uint8_t)~FWB_FLAG_ROLLED_BACK;
    if (meta_save(u) != 0) return FWB_NACK_FLASH;
    *resume = 0;
    return FWB_OK;
}

int fwb_update_chunk(fwb_update *u, const fwb_chunk *c, uint32_t *next, uint32_t *detail) {
    fwb_slot *s = &u->meta.slot[1u - u->meta.active];
    *detail = 0;
    if (s->state != FWB_SLOT_RECEIVING) return FWB_NACK_BAD_STATE;
    if (c->offset > s->progress) {
        *detail = s->progress;
        return FWB_NACK_BAD_OFFSET;
    }
    if ((uint64_t)c->offset + c->len > s->size) {
        *detail = s->size;
        return FWB_NACK_TOO_LARGE;
    }
    if ((uint64_t)c->offset + c->len <= s->progress) { /* a retransmission: already written */
        *next = s->progress;
        return FWB_OK;
    }
    /* Overlapping the written part: write only what is new. */
    uint32_t skip = s->progress - c->offset;
    uint32_t addr = fwb_slot_addr(u, (uint8_t)(1u - u->meta.active)) + s->progress;
    if (u->flash.write(u->flash.ctx, addr, c->data + skip, (uint32_t)(c->len - skip)) != 0) {
        return FWB_NACK_FLASH;
    }
    s->progress = c->offset + (uint32_t)c->len;
    if (meta_save(u) != 0) return FWB_NACK_FLASH;
    *next = s->progress;
    return FWB_OK;
}

int fwb_update_verify(fwb_update *u, uint32_t *detail) {
    uint8_t t = (uint8_t)(1u - u->meta.active);
    fwb_slot *s = &u->meta.slot[t];
    *detail = 0;
    if (s->state == FWB_SLOT_STAGED) return FWB_OK;
    if (s->state != FWB_SLOT_RECEIVING || s->progress != s->size) {
        *detail = s->progress;
        return FWB_NACK_BAD_STATE;
    }
    uint8_t got[FWB_SHA_LEN];
    if (fwb_slot_sha256(u, t, s->size, got) != 0) return FWB_NACK_FLASH;
    if (memcmp(got, s->sha256, FWB_SHA_LEN) != 0) {
        /* The bytes are not the signed image: start over rather than resume into them. */
        s->state = FWB_SLOT_EMPTY;
        s->progress = 0;
        (void)meta_save(u);
        return FWB_NACK_HASH_MISMATCH;
    }
    s->state = FWB_SLOT_STAGED;
    return meta_save(u) == 0 ? FWB_OK : FWB_NACK_FLASH;
}

int fwb_update_commit(fwb_update *u, uint8_t health, uint32_t *detail) {
    fwb_slot *s = &u->meta.slot[u->meta.active];
    *detail = 0;
    if (s->state != FWB_SLOT_TRIAL) return FWB_NACK_BAD_STATE;
    if (health != FWB_HEALTH_OK) return FWB_NACK_NOT_HEALTHY;
    s->state = FWB_SLOT_CONFIRMED;
    u->meta.floor = s->version;
    u->meta.flags &= (uint8_t)~FWB_FLAG_ROLLED_BACK;
    *detail = s->version;
    return meta_save(u) == 0 ? FWB_OK : FWB_NACK_FLASH;
}

int fwb_update_abort(fwb_update *u, uint32_t *detail) {
    fwb_slot *s = &u->meta.slot[1u - u->meta.active];
    *detail = 0;
    if (u->meta.slot[u->meta.active].state == FWB_SLOT_TRIAL) return FWB_NACK_BAD_STATE;
    if (s->state == FWB_SLOT_RECEIVING || s->state == FWB_SLOT_STAGED) {
        s->state = FWB_SLOT_EMPTY;
        s->progress = 0;
        return meta_save(u) == 0 ? FWB_OK : FWB_NACK_FLASH;
    }
    return FWB_OK;
}
