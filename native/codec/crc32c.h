// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init ~0, final xor ~0), the
// checksum of the bitstream. Hardware (SSE4.2) when the CPU has it, slicing table else.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace kvc {
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
}
