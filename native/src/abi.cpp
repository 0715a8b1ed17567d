// kvs_abi_version, compiled into libkvstore.so and libkvstore_cuda.so alike so the loader can
// check each library against the header it was built from.
#include "kvstore.h"

KVS_API int kvs_abi_version(void) { return KVS_ABI_VERSION; }
