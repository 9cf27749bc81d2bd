// llama.cpp's AMX kernels fill a 64-byte tile configuration on the stack and pass it to
// _tile_loadconfig. GCC 12's intrinsic declares that it reads only 8 bytes of it, so the
// optimiser drops the row/column stores and the CPU gets an empty configuration: the next tile
// instruction faults. dola-cpp compiles this function to assembly and checks that the store of
// `rows` (the first argument's register) survived.
#include "tile_config.h"

#include <immintrin.h>
#include <cstdint>

extern "C" void dola_probe_tilecfg(uint8_t rows) {
    alignas(64) tile_config tc = {};
    tc.palette_id = 1;
    tc.rows[5] = rows;
    _tile_loadconfig(&tc);
}
