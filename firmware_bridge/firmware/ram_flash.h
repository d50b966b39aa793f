/*
 * A flash in RAM for the host unit tests and the fuzzer: two metadata sectors and two slots of
 * SLOT bytes, every access bounds-checked, erase to 0xFF.
 *
 * Include it once, after fwb.h, from a test program that defines SLOT first.
 */
#ifndef FWB_RAM_FLASH_H
#define FWB_RAM_FLASH_H

#include <string.h>

#include "fwb.h"

#ifndef SLOT
#error "define SLOT (bytes of one firmware slot) before including ram_flash.h"
#endif

static uint8_t ram[2 * FWB_META_SECTOR + 2 * SLOT];
static int ram_read(void *c, uint32_t a, uint8_t *o, uint32_t n) {
    (void)c;
    if ((uint64_t)a + n > sizeof(ram)) return -1;
    memcpy(o, ram + a, n);
    return 0;
}
static int ram_write(void *c, uint32_t a, const uint8_t *d, uint32_t n) {
    (void)c;
    if ((uint64_t)a + n > sizeof(ram)) return -1;
    memcpy(ram + a, d, n);
    return 0;
}
static int ram_erase(void *c, uint32_t a, uint32_t n) {
    (void)c;
    if ((uint64_t)a + n > sizeof(ram)) return -1;
    memset(ram + a, 0xFF, n);
    return 0;
}

#endif
