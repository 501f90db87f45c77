/* memcpy's calls counted by size, for `MOVES=1 bash bench/mtls.sh`: preloaded into a proxy
 * (LD_PRELOAD), it passes every call on to memmove and counts it; at exit it writes the
 * counts to $MEMCPY_SIZES_OUT/PID (one line per size up to 4 KiB: "SIZE CALLS"; larger ones
 * together as "large CALLS BYTES"). Rust moves values bigger than a few words with memcpy,
 * so the sizes say which values are moved and how often. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned long by_size[4097];
static unsigned long large_calls, large_bytes;

void *memcpy(void *dst, const void *src, size_t n) {
  if (n <= 4096) {
    by_size[n]++;
  } else {
    large_calls++;
    large_bytes += n;
  }
  return memmove(dst, src, n);
}

__attribute__((destructor)) static void dump(void) {
  const char *dir = getenv("MEMCPY_SIZES_OUT");
  if (!dir) return;
  char path[512];
  snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
  FILE *f = fopen(path, "w");
  if (!f) return;
  for (int i = 0; i <= 4096; i++)
    if (by_size[i]) fprintf(f, "%d %lu\n", i, by_size[i]);
  fprintf(f, "large %lu %lu\n", large_calls, large_bytes);
  fclose(f);
}
