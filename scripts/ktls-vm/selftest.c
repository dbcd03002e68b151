/* ktls-vm selftest probe.
 * 1. Can an established TCP socket on 127.0.0.1 take the "tls" ULP?  ("TCP_ULP tls: ok")
 * 2. Does a kernel-to-kernel TLS 1.3 round trip work (TLS_TX on one end, TLS_RX on the other,
 *    same key) for AES-128-GCM and ChaCha20-Poly1305?  ("kTLS <cipher>: ok")
 * 3. Which crypto drivers did the kernel pick (from /proc/crypto)?
 * Exit 0 when everything worked. When the ULP is missing (a host without CONFIG_TLS) it
 * prints the errno and exits 0, or 1 with --require. Any other failure exits 1. */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef TCP_ULP
#define TCP_ULP 31
#endif
#ifndef SOL_TCP
#define SOL_TCP 6
#endif
#ifndef SOL_TLS
#define SOL_TLS 282
#endif

static int failed;

static int bad(const char *what) {
    printf("FAIL %s: %s (errno %d)\n", what, strerror(errno), errno);
    failed = 1;
    return -1;
}

/* Connected pair on 127.0.0.1: *c (client end), *s (server end). */
static int tcp_pair(int *c, int *s) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0) return bad("socket");
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) return bad("bind 127.0.0.1");
    if (listen(l, 1) < 0 || getsockname(l, (struct sockaddr *)&a, &alen) < 0) return bad("listen");
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0) return bad("socket");
    if (connect(*c, (struct sockaddr *)&a, sizeof a) < 0) return bad("connect 127.0.0.1");
    *s = accept(l, NULL, NULL);
    if (*s < 0) return bad("accept");
    close(l);
    return 0;
}

static void roundtrip(const char *name, const void *info, socklen_t len) {
    int c, s;
    if (tcp_pair(&c, &s) < 0) return;
    if (setsockopt(c, SOL_TCP, TCP_ULP, "tls", 4) < 0 || setsockopt(s, SOL_TCP, TCP_ULP, "tls", 4) < 0) {
        bad(name);
        goto out;
    }
    if (setsockopt(c, SOL_TLS, TLS_TX, info, len) < 0) { bad("TLS_TX"); goto out; }
    if (setsockopt(s, SOL_TLS, TLS_RX, info, len) < 0) { bad("TLS_RX"); goto out; }
    const char msg[] = "ktls-vm selftest record";
    if (write(c, msg, sizeof msg) != (ssize_t)sizeof msg) { bad("write on kTLS TX"); goto out; }
    char buf[128];
    size_t got = 0;
    while (got < sizeof msg) {
        ssize_t n = read(s, buf + got, sizeof buf - got);
        if (n <= 0) { bad("read on kTLS RX"); goto out; }
        got += (size_t)n;
    }
    if (got != sizeof msg || memcmp(buf, msg, sizeof msg) != 0) {
        printf("FAIL kTLS %s: decrypted data differs\n", name);
        failed = 1;
        goto out;
    }
    printf("kTLS %s: ok\n", name);
out:
    close(c);
    close(s);
}

/* Prints the driver /proc/crypto lists for an algorithm name (highest priority first). */
static void crypto_driver(const char *alg) {
    FILE *f = fopen("/proc/crypto", "r");
    if (!f) return;
    char line[256], name[128] = "", drivers[512] = "";
    while (fgets(line, sizeof line, f)) {
        char v[128];
        if (sscanf(line, "name : %127s", v) == 1) strcpy(name, v);
        else if (sscanf(line, "driver : %127s", v) == 1 && strcmp(name, alg) == 0 &&
                 strlen(drivers) + strlen(v) + 2 < sizeof drivers) {
            if (*drivers) strcat(drivers, " ");
            strcat(drivers, v);
        }
    }
    fclose(f);
    printf("%s driver(s): %s\n", alg, *drivers ? drivers : "(none instantiated)");
}

int main(int argc, char **argv) {
    int require = argc > 1 && strcmp(argv[1], "--require") == 0;
    struct utsname u;
    if (uname(&u) == 0) printf("kernel %s\n", u.release);

    int c, s;
    if (tcp_pair(&c, &s) < 0) return 1;
    /* The ULP can only be set on an established socket. */
    if (setsockopt(c, SOL_TCP, TCP_ULP, "tls", 4) < 0) {
        printf("TCP_ULP tls: %s (errno %d)\n", strerror(errno), errno);
        return require ? 1 : 0;
    }
    char ulp[16] = {0};
    socklen_t ulen = sizeof ulp;
    if (getsockopt(c, SOL_TCP, TCP_ULP, ulp, &ulen) < 0) return bad("getsockopt TCP_ULP"), 1;
    if (strcmp(ulp, "tls") != 0) {
        printf("FAIL TCP_ULP: setsockopt worked but getsockopt says \"%s\"\n", ulp);
        return 1;
    }
    printf("TCP_ULP tls: ok\n");
    close(c);
    close(s);

    struct tls12_crypto_info_aes_gcm_128 gcm;
    memset(&gcm, 0x11, sizeof gcm);
    gcm.info.version = TLS_1_3_VERSION;
    gcm.info.cipher_type = TLS_CIPHER_AES_GCM_128;
    roundtrip("TLS1.3 AES-128-GCM", &gcm, sizeof gcm);

    struct tls12_crypto_info_chacha20_poly1305 cc;
    memset(&cc, 0x22, sizeof cc);
    cc.info.version = TLS_1_3_VERSION;
    cc.info.cipher_type = TLS_CIPHER_CHACHA20_POLY1305;
    roundtrip("TLS1.3 ChaCha20-Poly1305", &cc, sizeof cc);

    crypto_driver("gcm(aes)");
    crypto_driver("rfc7539(chacha20,poly1305)");
    return failed;
}
