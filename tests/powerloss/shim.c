/* LD_PRELOAD shim for the power-loss harness (tests/powerloss).
 *
 * Logs, in one ordered append-only file, every call that changes what a disk
 * holds for the files of one directory: writes (with their bytes), truncates,
 * fsync/fdatasync of files and of the directory itself, creations, unlinks
 * and renames; plus every write to the acknowledgement file, which is how the
 * program says what it has acknowledged. The real call is made too, and it is
 * made and logged under one mutex, so the log's order is the order in which
 * the calls took effect, across threads. -shm files are skipped (SQLite
 * rebuilds them; they are not part of what survives a power cut).
 *
 * Environment: PL_DIR (the watched directory, absolute, as the program names
 * it), PL_LOG (the log file, outside PL_DIR), PL_ACK (the acknowledgement
 * file, outside PL_DIR).
 *
 * Record: "<type> <ns> <a> <b> <len>\t<name>[\t<name2>]\n" followed by <len>
 * bytes of data. Types: W write (a=offset), T truncate (a=size), S file sync,
 * D directory sync, C create, U unlink, R rename, A acknowledgement.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 65536
enum { K_NONE = 0, K_FILE = 1, K_DIR = 2, K_ACK = 3 };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *fdname[MAXFD];
static unsigned char fdkind[MAXFD];
static char watch[4096];
static size_t watchlen;
static char ackpath[4096];
static int logfd = -1;

static int (*r_open)(const char *, int, ...);
static int (*r_open64)(const char *, int, ...);
static int (*r_openat)(int, const char *, int, ...);
static int (*r_openat64)(int, const char *, int, ...);
static int (*r_close)(int);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pwrite64)(int, const void *, size_t, off_t);
static int (*r_ftruncate)(int, off_t);
static int (*r_ftruncate64)(int, off_t);
static int (*r_truncate)(const char *, off_t);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);
static int (*r_unlink)(const char *);
static int (*r_unlinkat)(int, const char *, int);
static int (*r_rename)(const char *, const char *);
static int (*r_renameat)(int, const char *, int, const char *);

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }

__attribute__((constructor)) static void init(void) {
    r_open = dlsym(RTLD_NEXT, "open");
    r_open64 = dlsym(RTLD_NEXT, "open64");
    r_openat = dlsym(RTLD_NEXT, "openat");
    r_openat64 = dlsym(RTLD_NEXT, "openat64");
    r_close = dlsym(RTLD_NEXT, "close");
    r_write = dlsym(RTLD_NEXT, "write");
    r_pwrite = dlsym(RTLD_NEXT, "pwrite");
    r_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    r_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    r_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    r_truncate = dlsym(RTLD_NEXT, "truncate");
    r_fsync = dlsym(RTLD_NEXT, "fsync");
    r_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    r_unlink = dlsym(RTLD_NEXT, "unlink");
    r_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    r_rename = dlsym(RTLD_NEXT, "rename");
    r_renameat = dlsym(RTLD_NEXT, "renameat");
    const char *d = getenv("PL_DIR"), *l = getenv("PL_LOG"), *a = getenv("PL_ACK");
    if (d && l) {
        snprintf(watch, sizeof watch, "%s", d);
        watchlen = strlen(watch);
        while (watchlen > 1 && watch[watchlen - 1] == '/') watch[--watchlen] = 0;
        if (a) snprintf(ackpath, sizeof ackpath, "%s", a);
        logfd = r_open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
    /* A child forked while another thread held the mutex must not inherit it locked. */
    pthread_atfork(lock, unlock, unlock);
}

/* Absolute form of path (relative to dirfd/cwd); returns 0 on failure. */
static int absolute(int dirfd, const char *path, char *out, size_t n) {
    if (path[0] == '/') { snprintf(out, n, "%s", path); return 1; }
    char base[4096];
    if (dirfd != AT_FDCWD && dirfd >= 0 && dirfd < MAXFD && fdkind[dirfd] == K_DIR) snprintf(base, sizeof base, "%s", watch);
    else if (!getcwd(base, sizeof base)) return 0;
    snprintf(out, n, "%s/%s", base, path);
    return 1;
}

/* The name inside the watched directory (NULL if elsewhere or -shm); "." for the directory. */
static const char *watched(int dirfd, const char *path, char *buf, size_t n) {
    if (logfd < 0 || !path) return NULL;
    if (!absolute(dirfd, path, buf, n)) return NULL;
    size_t len = strlen(buf);
    if (len == watchlen && strcmp(buf, watch) == 0) return ".";
    if (len <= watchlen + 1 || strncmp(buf, watch, watchlen) != 0 || buf[watchlen] != '/') return NULL;
    const char *name = buf + watchlen + 1;
    if (strchr(name, '/')) return NULL;
    if (len >= 4 && strcmp(buf + len - 4, "-shm") == 0) return NULL;
    return name;
}

static void emit(char type, long long a, long long b, const char *name, const char *name2, const void *data, size_t len) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char head[8400];
    int h = snprintf(head, sizeof head, "%c %lld %lld %lld %zu\t%s%s%s\n", type,
                     (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, a, b, len, name, name2 ? "\t" : "", name2 ? name2 : "");
    struct iovec iov[2] = {{head, (size_t)h}, {(void *)data, len}};
    size_t total = (size_t)h + len, done = 0;
    while (done < total) {
        ssize_t w = writev(logfd, iov, len ? 2 : 1);
        if (w <= 0) { if (errno == EINTR) continue; abort(); }
        done += (size_t)w;
        /* Advance the iovecs past what was written (a short write on a regular file is rare). */
        size_t k = (size_t)w;
        for (int i = 0; i < 2 && k; i++) { size_t t = k < iov[i].iov_len ? k : iov[i].iov_len; iov[i].iov_base = (char *)iov[i].iov_base + t; iov[i].iov_len -= t; k -= t; }
    }
}

static void track(int fd, int dirfd, const char *path) {
    if (fd < 0 || fd >= MAXFD) return;
    free(fdname[fd]); fdname[fd] = NULL; fdkind[fd] = K_NONE;
    char buf[4096];
    if (logfd >= 0 && ackpath[0] && absolute(dirfd, path, buf, sizeof buf) && strcmp(buf, ackpath) == 0) { fdkind[fd] = K_ACK; return; }
    const char *name = watched(dirfd, path, buf, sizeof buf);
    if (!name) return;
    fdname[fd] = strdup(name);
    fdkind[fd] = strcmp(name, ".") == 0 ? K_DIR : K_FILE;
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int at, int (*real)(), int is_at) {
    (void)at;
    char buf[4096];
    const char *name = watched(dirfd, path, buf, sizeof buf);
    lock();
    int existed = 1;
    if (name && (flags & O_CREAT)) { struct stat st; existed = fstatat(dirfd, path, &st, 0) == 0; }
    int fd = is_at ? real(dirfd, path, flags, mode) : real(path, flags, mode);
    int saved = errno;
    if (fd >= 0) {
        track(fd, dirfd, path);
        if (name && strcmp(name, ".") != 0) {
            if (!existed) emit('C', 0, 0, name, NULL, NULL, 0);
            if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY) emit('T', 0, 0, name, NULL, NULL, 0);
        }
    }
    unlock();
    errno = saved;
    return fd;
}

#define MODEARG mode_t mode = 0; if (flags & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, int); va_end(ap); }
int open(const char *path, int flags, ...) { MODEARG return do_open(AT_FDCWD, path, flags, mode, 0, (int (*)())r_open, 0); }
int open64(const char *path, int flags, ...) { MODEARG return do_open(AT_FDCWD, path, flags, mode, 0, (int (*)())r_open64, 0); }
int openat(int dirfd, const char *path, int flags, ...) { MODEARG return do_open(dirfd, path, flags, mode, 1, (int (*)())r_openat, 1); }
int openat64(int dirfd, const char *path, int flags, ...) { MODEARG return do_open(dirfd, path, flags, mode, 1, (int (*)())r_openat64, 1); }
int creat(const char *path, mode_t mode) { return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, 0, (int (*)())r_open, 0); }

int close(int fd) {
    if (fd >= 0 && fd < MAXFD && fdkind[fd] != K_NONE) {
        lock();
        int r = r_close(fd), saved = errno;
        free(fdname[fd]); fdname[fd] = NULL; fdkind[fd] = K_NONE;
        unlock();
        errno = saved;
        return r;
    }
    return r_close(fd);
}

static int kind(int fd) { return fd >= 0 && fd < MAXFD ? fdkind[fd] : K_NONE; }

static ssize_t logged_write(int fd, const void *data, size_t n, off_t off, int positional, ssize_t (*real_p)(int, const void *, size_t, off_t)) {
    int k = kind(fd);
    if (k != K_FILE && k != K_ACK) return positional ? real_p(fd, data, n, off) : r_write(fd, data, n);
    lock();
    if (!positional && k == K_FILE) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && (fl & O_APPEND)) { struct stat st; off = fstat(fd, &st) == 0 ? st.st_size : 0; }
        else off = lseek(fd, 0, SEEK_CUR);
    }
    ssize_t r = positional ? real_p(fd, data, n, off) : r_write(fd, data, n);
    int saved = errno;
    if (r > 0) {
        if (k == K_ACK) emit('A', 0, 0, "-", NULL, data, (size_t)r);
        else emit('W', off, 0, fdname[fd], NULL, data, (size_t)r);
    }
    unlock();
    errno = saved;
    return r;
}

ssize_t write(int fd, const void *data, size_t n) { return logged_write(fd, data, n, 0, 0, NULL); }
ssize_t pwrite(int fd, const void *data, size_t n, off_t off) { return logged_write(fd, data, n, off, 1, r_pwrite); }
ssize_t pwrite64(int fd, const void *data, size_t n, off_t off) { return logged_write(fd, data, n, off, 1, r_pwrite64); }

static int logged_trunc(int fd, off_t size, int (*real)(int, off_t)) {
    if (kind(fd) != K_FILE) return real(fd, size);
    lock();
    int r = real(fd, size), saved = errno;
    if (r == 0) emit('T', size, 0, fdname[fd], NULL, NULL, 0);
    unlock();
    errno = saved;
    return r;
}
int ftruncate(int fd, off_t size) { return logged_trunc(fd, size, r_ftruncate); }
int ftruncate64(int fd, off_t size) { return logged_trunc(fd, size, r_ftruncate64); }

int truncate(const char *path, off_t size) {
    char buf[4096];
    const char *name = watched(AT_FDCWD, path, buf, sizeof buf);
    if (!name) return r_truncate(path, size);
    lock();
    int r = r_truncate(path, size), saved = errno;
    if (r == 0) emit('T', size, 0, name, NULL, NULL, 0);
    unlock();
    errno = saved;
    return r;
}

static int logged_sync(int fd, int (*real)(int)) {
    int k = kind(fd);
    if (k != K_FILE && k != K_DIR) return real(fd);
    lock();
    int r = real(fd), saved = errno;
    if (r == 0) emit(k == K_DIR ? 'D' : 'S', 0, 0, fdname[fd], NULL, NULL, 0);
    unlock();
    errno = saved;
    return r;
}
int fsync(int fd) { return logged_sync(fd, r_fsync); }
int fdatasync(int fd) { return logged_sync(fd, r_fdatasync); }

static int logged_unlink(int dirfd, const char *path, int flags, int is_at) {
    char buf[4096];
    const char *name = watched(dirfd, path, buf, sizeof buf);
    if (!name) return is_at ? r_unlinkat(dirfd, path, flags) : r_unlink(path);
    lock();
    int r = is_at ? r_unlinkat(dirfd, path, flags) : r_unlink(path), saved = errno;
    if (r == 0) emit('U', 0, 0, name, NULL, NULL, 0);
    unlock();
    errno = saved;
    return r;
}
int unlink(const char *path) { return logged_unlink(AT_FDCWD, path, 0, 0); }
int unlinkat(int dirfd, const char *path, int flags) { return logged_unlink(dirfd, path, flags, 1); }

static int logged_rename(int fd1, const char *a, int fd2, const char *b, int is_at) {
    char b1[4096], b2[4096];
    const char *n1 = watched(fd1, a, b1, sizeof b1), *n2 = watched(fd2, b, b2, sizeof b2);
    if (!n1 && !n2) return is_at ? r_renameat(fd1, a, fd2, b) : r_rename(a, b);
    lock();
    int r = is_at ? r_renameat(fd1, a, fd2, b) : r_rename(a, b), saved = errno;
    /* A rename into or out of the directory is a create or an unlink of the name there. */
    if (r == 0) emit('R', 0, 0, n1 ? n1 : "", n2 ? n2 : "", NULL, 0);
    unlock();
    errno = saved;
    return r;
}
int rename(const char *a, const char *b) { return logged_rename(AT_FDCWD, a, AT_FDCWD, b, 0); }
int renameat(int fd1, const char *a, int fd2, const char *b) { return logged_rename(fd1, a, fd2, b, 1); }
