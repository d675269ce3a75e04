/* libnbd-aio-bench: the libnbd side of nbd-rs's benchmark.
 *
 * The same workload, flags and output as nbd-mio/examples/aio-bench.rs, on
 * libnbd's asynchronous API, so that bench/compare.py can race the two:
 *
 *   - one connection, the default handshake (structured replies requested
 *     unless -S, no meta context, no TLS);
 *   - the byte range [0, TOTAL) cut into REQSIZE requests issued in
 *     ascending offset order, wrapping around the export;
 *   - at most DEPTH requests in flight, a new one issued as each completes;
 *   - one buffer per slot, allocated and touched before timing and reused
 *     for every request; writes send the non-zero pattern 0xa5 ^ slot;
 *   - libnbd's pread_initialize turned off (aio-bench never zeroes a read
 *     buffer either); -I turns it back on (libnbd's default);
 *   - the clock runs from the first request to the last reply; usr/sys are
 *     this process's CPU time over the same span (getrusage).
 *
 * Usage: libnbd-aio-bench [-w] [-r REQSIZE] [-q DEPTH] [-n TOTAL] [-i ITER]
 *                         [-S] [-I] [-V] [-j] URI|SOCKET
 *   -w  write instead of read        -r  request size (k/m/g suffix; 256k)
 *   -q  requests in flight (16)      -n  bytes per iteration (export size)
 *   -i  iterations (1)               -S  no structured replies
 *   -I  libnbd zeroes read buffers   -V  verify nbdkit pattern data
 *   -j  one JSON object per iteration
 * The target is an NBD URI, or else the path of a Unix socket.
 *
 * Output, one line per iteration:
 *   read rs=262144 qd=16 bytes=1073741824 secs=0.412 GiB/s=2.427 usr=0.101
 *   sys=0.297 cpu_s_per_GiB=0.398
 * or with -j the JSON object aio-bench prints (client "libnbd", without
 * aio-bench's allocation and syscall counters).
 *
 * Build: cc -O2 -Wall -o libnbd-aio-bench libnbd-aio-bench.c \
 *          $(pkg-config --cflags --libs libnbd)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

struct bench;

struct slot {
  struct bench *b;
  size_t index;
  uint64_t offset;
  char *buf;
};

struct bench {
  struct slot *slots;
  size_t *free_stack;  /* indexes of idle slots */
  size_t nfree;
  uint64_t bytes_done;
  uint64_t reqsize;
  int first_error;     /* errno of the first failed request, 0 if none */
  uint64_t bad_offset; /* first offset whose data failed -V, or UINT64_MAX */
  bool verify;
  bool write;
};

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s\n", what, nbd_get_error () ? nbd_get_error () : "");
  exit (EXIT_FAILURE);
}

/* Digits, then an optional k/m/g suffix, nothing after. */
static uint64_t
parse_size (const char *s)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull (s, &end, 10);
  if (errno != 0 || end == s) {
    fprintf (stderr, "bad size: %s\n", s);
    exit (EXIT_FAILURE);
  }
  int shift = 0;
  if (*end == 'k' || *end == 'K')
    shift = 10;
  else if (*end == 'm' || *end == 'M')
    shift = 20;
  else if (*end == 'g' || *end == 'G')
    shift = 30;
  else if (*end != '\0') {
    fprintf (stderr, "bad size: %s\n", s);
    exit (EXIT_FAILURE);
  }
  if (shift != 0 && end[1] != '\0') {
    fprintf (stderr, "bad size: %s\n", s);
    exit (EXIT_FAILURE);
  }
  return (uint64_t) v << shift;
}

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
cpu_times (double *usr, double *sys)
{
  struct rusage ru;
  if (getrusage (RUSAGE_SELF, &ru) != 0) {
    perror ("getrusage");
    exit (EXIT_FAILURE);
  }
  *usr = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
  *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* nbdkit's pattern plugin: each aligned 8-byte word holds its own offset,
 * big-endian. */
static bool
pattern_ok (const char *buf, uint64_t len, uint64_t offset)
{
  for (uint64_t i = 0; i + 8 <= len; i += 8) {
    uint64_t v = 0;
    for (int k = 0; k < 8; k++)
      v = (v << 8) | (unsigned char) buf[i + k];
    if (v != offset + i)
      return false;
  }
  return true;
}

/* Runs inside nbd_poll when a command retires: frees the slot. */
static int
on_complete (void *user_data, int *error)
{
  struct slot *s = user_data;
  struct bench *b = s->b;
  if (*error != 0 && b->first_error == 0)
    b->first_error = *error;
  if (*error == 0 && b->verify && !b->write &&
      b->bad_offset == UINT64_MAX && !pattern_ok (s->buf, b->reqsize, s->offset))
    b->bad_offset = s->offset;
  b->bytes_done += b->reqsize;
  b->free_stack[b->nfree++] = s->index;
  return 1; /* retire the command: no nbd_aio_command_completed needed */
}

int
main (int argc, char *argv[])
{
  bool write = false, no_sr = false, zero_reads = false, verify = false,
    json = false;
  uint64_t reqsize = 256 * 1024, depth = 16, total = 0, iterations = 1;
  int c;

  while ((c = getopt (argc, argv, "wr:q:n:i:SIVj")) != -1) {
    switch (c) {
    case 'w': write = true; break;
    case 'r': reqsize = parse_size (optarg); break;
    case 'q': depth = parse_size (optarg); break;
    case 'n': total = parse_size (optarg); break;
    case 'i': iterations = parse_size (optarg); break;
    case 'S': no_sr = true; break;
    case 'I': zero_reads = true; break;
    case 'V': verify = true; break;
    case 'j': json = true; break;
    default:
      fprintf (stderr, "usage: %s [-w] [-r REQSIZE] [-q DEPTH] [-n TOTAL] "
               "[-i ITER] [-S] [-I] [-V] [-j] URI|SOCKET\n", argv[0]);
      exit (EXIT_FAILURE);
    }
  }
  if (optind != argc - 1 || depth == 0 || reqsize == 0 || iterations == 0) {
    fprintf (stderr, "%s: need exactly one URI; sizes must be > 0\n", argv[0]);
    exit (EXIT_FAILURE);
  }
  const char *target = argv[optind];

  struct nbd_handle *h = nbd_create ();
  if (h == NULL)
    die ("nbd_create");
  if (nbd_set_request_structured_replies (h, !no_sr) == -1)
    die ("nbd_set_request_structured_replies");
  if (nbd_set_pread_initialize (h, zero_reads) == -1)
    die ("nbd_set_pread_initialize");

  double t_conn0 = now ();
  int r = strstr (target, "://") ? nbd_connect_uri (h, target)
                                 : nbd_connect_unix (h, target);
  if (r == -1)
    die (target);
  double t_conn = now () - t_conn0;

  int64_t ssize = nbd_get_size (h);
  if (ssize < 0)
    die ("nbd_get_size");
  uint64_t size = ssize;
  if (total == 0)
    total = size;
  if (size < reqsize || size % reqsize != 0) {
    fprintf (stderr, "export size %" PRIu64 " must be a multiple of the "
             "request size %" PRIu64 "\n", size, reqsize);
    exit (EXIT_FAILURE);
  }
  if (total % reqsize != 0) {
    fprintf (stderr, "total must be a multiple of the request size\n");
    exit (EXIT_FAILURE);
  }
  if (write && nbd_is_read_only (h) == 1) {
    fprintf (stderr, "export is read-only\n");
    exit (EXIT_FAILURE);
  }
  int structured = nbd_get_structured_replies_negotiated (h);

  /* One buffer per slot, non-zero and touched now so that page faults are
   * not timed. */
  struct bench b = { .reqsize = reqsize, .verify = verify, .write = write };
  b.slots = calloc (depth, sizeof *b.slots);
  b.free_stack = calloc (depth, sizeof *b.free_stack);
  if (b.slots == NULL || b.free_stack == NULL) {
    perror ("calloc");
    exit (EXIT_FAILURE);
  }
  for (size_t i = 0; i < depth; i++) {
    b.slots[i] = (struct slot) { .b = &b, .index = i };
    b.slots[i].buf = malloc (reqsize);
    if (b.slots[i].buf == NULL) {
      perror ("malloc");
      exit (EXIT_FAILURE);
    }
    memset (b.slots[i].buf, 0xa5 ^ (unsigned char) i, reqsize);
  }

  for (uint64_t iteration = 0; iteration < iterations; iteration++) {
    b.nfree = 0;
    for (size_t i = depth; i > 0; i--)
      b.free_stack[b.nfree++] = i - 1;
    b.bytes_done = 0;
    b.first_error = 0;
    b.bad_offset = UINT64_MAX;
    uint64_t next = 0;

    double usr0, sys0, usr1, sys1;
    cpu_times (&usr0, &sys0);
    double t0 = now ();

    while (b.bytes_done < total) {
      while (next < total && b.nfree > 0) {
        struct slot *s = &b.slots[b.free_stack[--b.nfree]];
        s->offset = next % size;
        nbd_completion_callback cb = { .callback = on_complete, .user_data = s };
        int64_t cookie = write
          ? nbd_aio_pwrite (h, s->buf, reqsize, s->offset, cb, 0)
          : nbd_aio_pread (h, s->buf, reqsize, s->offset, cb, 0);
        if (cookie == -1)
          die (write ? "nbd_aio_pwrite" : "nbd_aio_pread");
        next += reqsize;
      }
      if (nbd_poll (h, -1) == -1)
        die ("nbd_poll");
      if (b.first_error != 0) {
        fprintf (stderr, "request failed: %s\n", strerror (b.first_error));
        exit (EXIT_FAILURE);
      }
      if (b.bad_offset != UINT64_MAX) {
        fprintf (stderr, "verify failed in the request at offset %" PRIu64 "\n",
                 b.bad_offset);
        exit (EXIT_FAILURE);
      }
    }

    double secs = now () - t0;
    cpu_times (&usr1, &sys1);
    double usr = usr1 - usr0, sys = sys1 - sys0;
    double gib = total / (double) (1ULL << 30);
    const char *op = write ? "write" : "read";
    if (json)
      printf ("{\"client\":\"libnbd\",\"op\":\"%s\",\"request_size\":%" PRIu64
              ",\"queue_depth\":%" PRIu64 ",\"bytes\":%" PRIu64
              ",\"iteration\":%" PRIu64 ",\"secs\":%.6f,\"gib_per_s\":%.4f"
              ",\"user_s\":%.4f,\"sys_s\":%.4f,\"cpu_s_per_gib\":%.4f"
              ",\"connect_s\":%.6f,\"structured\":%d,\"pread_initialize\":%d}\n",
              op, reqsize, depth, total, iteration, secs, gib / secs, usr, sys,
              (usr + sys) / gib, t_conn, structured == 1, zero_reads);
    else
      printf ("%s rs=%" PRIu64 " qd=%" PRIu64 " bytes=%" PRIu64
              " secs=%.3f GiB/s=%.3f usr=%.3f sys=%.3f cpu_s_per_GiB=%.3f\n",
              op, reqsize, depth, total, secs, gib / secs, usr, sys,
              (usr + sys) / gib);
    fflush (stdout);
  }

  if (nbd_shutdown (h, 0) == -1)
    die ("nbd_shutdown");
  nbd_close (h);
  for (size_t i = 0; i < depth; i++)
    free (b.slots[i].buf);
  free (b.slots);
  free (b.free_stack);
  return EXIT_SUCCESS;
}
