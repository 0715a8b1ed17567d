#include "error.h"

#include <stdarg.h>
#include <stdio.h>

namespace kvs {

int fail(char* err, size_t err_len, int code, const char* fmt, ...) {
  if (err != nullptr && err_len > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
  }
  return code;
}

}  // namespace kvs
