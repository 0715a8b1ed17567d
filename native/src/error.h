// Internal: the one way a native function reports failure (kvstore.h, "Error scheme").
#pragma once
#include <stddef.h>

#include "kvstore.h"

namespace kvs {

// Writes the printf-style message into err[0 .. err_len) (when err is non-null and err_len > 0,
// always NUL-terminated, truncated if needed) and returns `code` (a negative KVS_E* value).
int fail(char* err, size_t err_len, int code, const char* fmt, ...) __attribute__((format(printf, 4, 5)));

}  // namespace kvs
