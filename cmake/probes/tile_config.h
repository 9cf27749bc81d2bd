// The 64-byte AMX tile configuration as llama.cpp's AMX kernels declare it (palette 1).
#pragma once

#include <cstdint>

struct tile_config {
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};
