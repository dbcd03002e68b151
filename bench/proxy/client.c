/*
 * Load client for `cargo bench --bench proxy`: the real libvirt C library, so every byte
 * the proxy sees is what a real client sends. Built by the bench at run time:
 *   cc -O2 -o target/bench-proxy-client bench/proxy/client.c $(pkg-config --cflags --libs libvirt) -lpthread
 *
 *   client calls URI PROC THREADS SECONDS   PROC = libversion | listall
 *       THREADS threads, each with its own connection, call PROC in a loop for SECONDS
 *       (after a short warm-up); prints {"calls","secs","rate","p50_us","p90_us","p99_us","max_us"}
 *   client open URI COUNT
 *       COUNT sequential virConnectOpen (timed) + virConnectClose (not timed);
 *       prints {"count","p50_us","p90_us","p99_us","mean_us"}
 *   client download URI POOL VOL
 *       virStorageVolDownload of the whole volume into a counting sink (no disk I/O here);
 *       prints {"bytes","secs"}
 *   client upload URI POOL VOL BYTES
 *       virStorageVolUpload of BYTES of generated non-zero data; prints {"bytes","secs"}
 *   client idle URI COUNT THREADS
 *       opens COUNT connections (THREADS threads), prints "ready COUNT", then waits for EOF
 *       on stdin; then makes one call on every connection and prints {"opened","alive"}
 *
 * Exit status 0 on success; libvirt errors go to stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    virErrorPtr e = virGetLastError();
    fprintf(stderr, "client: %s: %s\n", what, e && e->message ? e->message : strerror(errno));
    exit(1);
}

/* ---- latency samples ------------------------------------------------------------------ */

struct samples {
    uint64_t *v;
    size_t n, cap;
};

static void push(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof(uint64_t));
        if (!s->v)
            die("realloc");
    }
    s->v[s->n++] = ns;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of sorted samples, in microseconds */
static double pct_us(const struct samples *s, double p)
{
    if (!s->n)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)s->n);
    if (i >= s->n)
        i = s->n - 1;
    return (double)s->v[i] / 1000.0;
}

/* ---- calls ------------------------------------------------------------------------------ */

enum proc_kind { P_LIBVERSION, P_LISTALL };

struct call_thread {
    pthread_t tid;
    const char *uri;
    enum proc_kind proc;
    virConnectPtr conn;
    pthread_barrier_t *ready, *go;
    volatile double *deadline;
    struct samples s;
    double end;
    int failed;
};

static int one_call(virConnectPtr c, enum proc_kind p)
{
    if (p == P_LIBVERSION) {
        unsigned long v;
        return virConnectGetLibVersion(c, &v);
    } else {
        virDomainPtr *doms = NULL;
        int n = virConnectListAllDomains(c, &doms, 0);
        for (int i = 0; i < n; i++)
            virDomainFree(doms[i]);
        free(doms);
        return n < 0 ? -1 : 0;
    }
}

static void *call_main(void *arg)
{
    struct call_thread *t = arg;
    t->conn = virConnectOpen(t->uri);
    if (!t->conn) {
        t->failed = 1;
        fprintf(stderr, "client: open %s failed: %s\n", t->uri, virGetLastErrorMessage());
    } else {
        for (int i = 0; i < 200; i++) /* warm-up: allocator, caches, daemon worker threads */
            if (one_call(t->conn, t->proc) < 0)
                t->failed = 1;
    }
    pthread_barrier_wait(t->ready);
    pthread_barrier_wait(t->go);
    if (!t->failed) {
        double dl = *t->deadline;
        for (;;) {
            uint64_t a = now_ns();
            if (one_call(t->conn, t->proc) < 0) {
                t->failed = 1;
                fprintf(stderr, "client: call failed: %s\n", virGetLastErrorMessage());
                break;
            }
            uint64_t b = now_ns();
            push(&t->s, b - a);
            if ((double)b / 1e9 >= dl)
                break;
        }
    }
    t->end = now_s();
    return NULL;
}

static int cmd_calls(const char *uri, const char *proc, int threads, double secs)
{
    enum proc_kind p;
    if (!strcmp(proc, "libversion"))
        p = P_LIBVERSION;
    else if (!strcmp(proc, "listall"))
        p = P_LISTALL;
    else {
        fprintf(stderr, "client: unknown proc %s\n", proc);
        return 2;
    }
    pthread_barrier_t ready, go;
    pthread_barrier_init(&ready, NULL, threads + 1);
    pthread_barrier_init(&go, NULL, threads + 1);
    volatile double deadline = 0;
    struct call_thread *ts = calloc(threads, sizeof(*ts));
    for (int i = 0; i < threads; i++) {
        ts[i].uri = uri;
        ts[i].proc = p;
        ts[i].ready = &ready;
        ts[i].go = &go;
        ts[i].deadline = &deadline;
        if (pthread_create(&ts[i].tid, NULL, call_main, &ts[i]))
            die("pthread_create");
    }
    pthread_barrier_wait(&ready);
    double start = now_s();
    deadline = start + secs;
    pthread_barrier_wait(&go);
    struct samples all = {0};
    double end = start;
    int failed = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ts[i].tid, NULL);
        failed |= ts[i].failed;
        if (ts[i].end > end)
            end = ts[i].end;
        for (size_t j = 0; j < ts[i].s.n; j++)
            push(&all, ts[i].s.v[j]);
        if (ts[i].conn)
            virConnectClose(ts[i].conn);
    }
    if (failed)
        return 1;
    qsort(all.v, all.n, sizeof(uint64_t), cmp_u64);
    double el = end - start;
    printf("{\"calls\":%zu,\"secs\":%.6f,\"rate\":%.3f,\"p50_us\":%.3f,\"p90_us\":%.3f,"
           "\"p99_us\":%.3f,\"max_us\":%.3f}\n",
           all.n, el, (double)all.n / el, pct_us(&all, 50), pct_us(&all, 90), pct_us(&all, 99),
           pct_us(&all, 100));
    return 0;
}

/* ---- open -------------------------------------------------------------------------------- */

static int cmd_open(const char *uri, int count)
{
    struct samples s = {0};
    double sum = 0;
    for (int i = -5; i < count; i++) { /* 5 untimed warm-up opens */
        uint64_t a = now_ns();
        virConnectPtr c = virConnectOpen(uri);
        uint64_t b = now_ns();
        if (!c)
            die("virConnectOpen");
        virConnectClose(c);
        if (i >= 0) {
            push(&s, b - a);
            sum += (double)(b - a) / 1000.0;
        }
    }
    qsort(s.v, s.n, sizeof(uint64_t), cmp_u64);
    printf("{\"count\":%zu,\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,\"mean_us\":%.3f}\n", s.n,
           pct_us(&s, 50), pct_us(&s, 90), pct_us(&s, 99), sum / (double)s.n);
    return 0;
}

/* ---- streams ----------------------------------------------------------------------------- */

static int sink(virStreamPtr st, const char *data, size_t nbytes, void *opaque)
{
    (void)st;
    (void)data;
    *(uint64_t *)opaque += nbytes;
    return (int)nbytes;
}

struct gen {
    uint64_t left;
    char *pat;
    size_t patlen, off;
};

static int source(virStreamPtr st, char *data, size_t nbytes, void *opaque)
{
    (void)st;
    struct gen *g = opaque;
    size_t n = nbytes;
    if (n > g->left)
        n = (size_t)g->left;
    size_t done = 0;
    while (done < n) {
        size_t k = g->patlen - g->off;
        if (k > n - done)
            k = n - done;
        memcpy(data + done, g->pat + g->off, k);
        done += k;
        g->off = (g->off + k) % g->patlen;
    }
    g->left -= n;
    return (int)n;
}

static virStorageVolPtr lookup_vol(virConnectPtr c, const char *pool, const char *vol)
{
    virStoragePoolPtr p = virStoragePoolLookupByName(c, pool);
    if (!p)
        die("virStoragePoolLookupByName");
    virStorageVolPtr v = virStorageVolLookupByName(p, vol);
    if (!v)
        die("virStorageVolLookupByName");
    virStoragePoolFree(p);
    return v;
}

static int cmd_stream(int upload, const char *uri, const char *pool, const char *vol,
                      uint64_t bytes)
{
    virConnectPtr c = virConnectOpen(uri);
    if (!c)
        die("virConnectOpen");
    virStorageVolPtr v = lookup_vol(c, pool, vol);
    virStreamPtr st = virStreamNew(c, 0);
    if (!st)
        die("virStreamNew");
    uint64_t got = 0;
    double t0 = now_s();
    if (upload) {
        struct gen g = {.left = bytes, .patlen = 1 << 20};
        g.pat = malloc(g.patlen + 4096);
        uint64_t x = 0x9e3779b97f4a7c15ull; /* xorshift: non-zero, not compressible */
        for (size_t i = 0; i < g.patlen; i += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memcpy(g.pat + i, &x, 8);
        }
        if (virStorageVolUpload(v, st, 0, bytes, 0) < 0)
            die("virStorageVolUpload");
        if (virStreamSendAll(st, source, &g) < 0)
            die("virStreamSendAll");
        got = bytes - g.left;
    } else {
        if (virStorageVolDownload(v, st, 0, 0, 0) < 0)
            die("virStorageVolDownload");
        if (virStreamRecvAll(st, sink, &got) < 0)
            die("virStreamRecvAll");
    }
    if (virStreamFinish(st) < 0)
        die("virStreamFinish");
    double secs = now_s() - t0;
    virStreamFree(st);
    virStorageVolFree(v);
    virConnectClose(c);
    printf("{\"bytes\":%" PRIu64 ",\"secs\":%.6f}\n", got, secs);
    return 0;
}

/* ---- idle -------------------------------------------------------------------------------- */

struct idle_thread {
    pthread_t tid;
    const char *uri;
    virConnectPtr *conns;
    int n, opened, alive;
};

static void *idle_open(void *arg)
{
    struct idle_thread *t = arg;
    for (int i = 0; i < t->n; i++) {
        t->conns[i] = virConnectOpen(t->uri);
        if (!t->conns[i]) {
            fprintf(stderr, "client: idle open %d failed: %s\n", i, virGetLastErrorMessage());
            break;
        }
        t->opened++;
    }
    return NULL;
}

static void *idle_check(void *arg)
{
    struct idle_thread *t = arg;
    for (int i = 0; i < t->opened; i++) {
        unsigned long v;
        if (virConnectGetLibVersion(t->conns[i], &v) == 0)
            t->alive++;
    }
    return NULL;
}

static int cmd_idle(const char *uri, int count, int threads)
{
    if (threads < 1)
        threads = 1;
    struct idle_thread *ts = calloc(threads, sizeof(*ts));
    virConnectPtr *conns = calloc(count, sizeof(*conns));
    int base = 0;
    for (int i = 0; i < threads; i++) {
        ts[i].uri = uri;
        ts[i].n = count / threads + (i < count % threads);
        ts[i].conns = conns + base;
        base += ts[i].n;
        if (pthread_create(&ts[i].tid, NULL, idle_open, &ts[i]))
            die("pthread_create");
    }
    int opened = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ts[i].tid, NULL);
        opened += ts[i].opened;
    }
    printf("ready %d\n", opened);
    fflush(stdout);
    if (opened != count)
        return 1;
    char buf[256];
    while (fread(buf, 1, sizeof(buf), stdin) > 0)
        ;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&ts[i].tid, NULL, idle_check, &ts[i]))
            die("pthread_create");
    int alive = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ts[i].tid, NULL);
        alive += ts[i].alive;
    }
    printf("{\"opened\":%d,\"alive\":%d}\n", opened, alive);
    fflush(stdout);
    /* exit closes every socket at once; closing 2,000+ connections one RPC at a time
     * would only measure the daemon */
    _exit(alive == opened ? 0 : 1);
}

int main(int argc, char **argv)
{
    if (argc >= 6 && !strcmp(argv[1], "calls"))
        return cmd_calls(argv[2], argv[3], atoi(argv[4]), atof(argv[5]));
    if (argc >= 4 && !strcmp(argv[1], "open"))
        return cmd_open(argv[2], atoi(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "download"))
        return cmd_stream(0, argv[2], argv[3], argv[4], 0);
    if (argc >= 6 && !strcmp(argv[1], "upload"))
        return cmd_stream(1, argv[2], argv[3], argv[4], strtoull(argv[5], NULL, 10));
    if (argc >= 5 && !strcmp(argv[1], "idle"))
        return cmd_idle(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: client calls URI libversion|listall THREADS SECONDS\n"
                    "       client open URI COUNT\n"
                    "       client download URI POOL VOL\n"
                    "       client upload URI POOL VOL BYTES\n"
                    "       client idle URI COUNT THREADS\n");
    return 2;
}
