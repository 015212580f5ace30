/*
 * wisp-init: PID 1 of every sprite, and the agent that starts processes in it.
 *
 * Why this exists: `runc exec` costs 30-40 ms per command and cannot hand out a PTY while
 * staying in the foreground. The host server instead connects to this agent's unix socket
 * (`/.wisp/run/agent.sock` inside, `<run dir>/agent.sock` on the host) and asks it to fork
 * the command: a few milliseconds, a real PTY from the sprite's own devpts, and the exit
 * status.
 *
 * Build: gcc -static -O2 -Wall -Wextra -o build/wisp-init wisp/runtime/init/wisp-init.c
 * Usage: wisp-init [SOCKET_PATH]      (default /.wisp/run/agent.sock)
 *
 * Protocol (SOCK_SEQPACKET, one connection per process, every message one packet):
 *
 *   server -> agent   request: NUL-terminated strings, the first is "spawn", then
 *                     "path=P" (optional, default argv[0]), "arg=A" (repeated, argv),
 *                     "env=K=V" (repeated, the whole environment), "cwd=D", "uid=N",
 *                     "gid=N", "groups=N,N,..", "tty=0|1", "rows=N", "cols=N".
 *                     Non-TTY: via SCM_RIGHTS the child's three fds (stdin, stdout,
 *                     stderr), then the host's ends the agent keeps (see "Sessions"):
 *                     stdin write end, stdout read end, stderr read end (6 fds), or only
 *                     the two read ends (5 fds: no stdin pipe), or none (3 fds).
 *                     TTY: no fds.
 *   agent -> server   "pid N"   (TTY: with the PTY master fd via SCM_RIGHTS)
 *                     "error MESSAGE"   (request refused; the connection is closed)
 *                     "exit N"  (N = exit code, or 128+signal; the connection is closed)
 *   server -> agent   "signal N" (to the process group of the command)
 *                     "stdin-close" (the server closed its stdin end: the agent closes its
 *                     copy, so the process reads EOF)
 *
 *   server -> agent   "sessions" -> one line per orphan (below), "PID\tSTATE\tCODE\n",
 *                     STATE running|exited, CODE -1 while running; "\n" if none. Closed.
 *   server -> agent   "adopt" "pid=N" -> binds this connection to orphan N: "pid N" with
 *                     its kept host ends via SCM_RIGHTS (1 fd: the PTY master; 2: stdout,
 *                     stderr; 3: stdin, stdout, stderr), then, like a spawn, "exit N" (at
 *                     once if it exited already; the record is then freed) and "signal N",
 *                     "stdin-close" apply. "error no such process" / "error process is
 *                     attached" / "error bad adopt request" otherwise.
 *
 *   server -> agent   "cgroups" with up to MAX_JOIN fds via SCM_RIGHTS: each an open
 *                     (by host root) `cgroup.procs` of the sprite's workload cgroup in one
 *                     hierarchy. The agent keeps them; every spawned child writes "0" to
 *                     each before it execs, moving itself in. Answer "ok"; connection closed.
 *
 *   server -> agent   service supervision (see "Services" below; one request per
 *                     connection, answered "ok", "error MESSAGE" or, for svc-list, the table):
 *                     "svc-define" "name=N" "start=0|1" "logdir=D" "logmax=BYTES" then a
 *                     complete non-TTY spawn request ("spawn" "arg=…" "env=…" …, no fds);
 *                     "svc-start" "name=N"; "svc-stop" "name=N" "timeout=MS";
 *                     "svc-delete" "name=N" "timeout=MS"; "svc-signal" "name=N" "sig=S";
 *                     "svc-quiesce" (the sprite is stopping: restart nothing more);
 *                     "svc-list" -> one line per service, tab-separated:
 *                     name status pid started_unix restart_count next_restart_unix
 *                     last_exit error (0 / -1 / "" where unknown).
 *
 * Services: the agent itself supervises long-running processes, so a crash is restarted
 * even while the host server is busy or gone. A service runs like an exec'd command
 * (workload cgroup via the zygote, the request's uid/env/cwd), with stdin /dev/null and
 * stdout/stderr pipes the agent reads into DIR/NAME.log (both streams), NAME.stdout.log and
 * NAME.stderr.log, each rotated to FILE.1 past logmax bytes. It is restarted whenever it
 * exits unless stopped explicitly: at once the first time, then after a delay that doubles
 * from 250 ms to 30 s while it keeps dying within 10 s of its start. Stop: SIGTERM to its
 * process group, SIGKILL after the timeout. The definitions are the server's (it sends
 * them at every boot); the agent keeps only what it was told.
 *
 * Spawns do not move processes between cgroups: a "zygote" child of the agent lives in the
 * workload cgroups and forks each command there with CLONE_PARENT, so the command is the
 * agent's child (reaped, signalled and reported as before) but starts in the workload. A
 * cgroup move costs the kernel an RCU grace period (~8 ms here) the first time after a
 * pause; only the zygote pays it, once. With no zygote (it was killed, the workload is
 * full) the agent forks in its reserve and the child moves itself.
 *
 * Why the workload cgroups: the agent lives in the sprite's outer cgroup, whose pids and
 * memory limits are the workload's plus a small reserve. A fork bomb or a memory hog fills
 * the workload cgroup, never the reserve, so the agent can still fork the process the user
 * needs (`kill -9 -1`): the kernel charges a migration even past a full pids limit.
 *
 * Sessions: the agent keeps a copy of the host's ends of each process's pipes (of its PTY
 * master) for as long as it keeps the process's record; it never reads or writes them. So
 * a server that dies (or detaches, closing the connection while the process runs) takes
 * nothing with it: the process sees no EOF, EPIPE or SIGHUP, and what it writes waits in
 * the pipe (once a pipe is full, 64 KiB by default, the writer blocks until a server
 * adopts it and reads; nothing is lost). The record of such a process is an "orphan"; it
 * keeps its exit code once reaped, and its ends (which may hold unread output) until a
 * server adopts it. Exited orphans are bounded: past MAX_EXITED_ORPHANS (64) the one that
 * exited first is dropped; MAX_ORPHANS records in all (a running orphan that finds none
 * free runs on without its ends, as if the agent had never kept them). A connection that
 * closes after its process's exit frees everything (the server read the exit).
 *
 * If the server closes the connection, the process keeps running, detached. Spawn
 * failures after the fork (bad cwd, command not found) are reported the way a shell
 * reports them: a message on the child's stderr and exit 127 / 126 / 1.
 *
 * PID 1 duties: reap every child, orphans included; on SIGTERM (or SIGINT) send SIGTERM
 * to every process, wait up to 2 s, SIGKILL what is left, exit.
 *
 * The agent is single-threaded (one poll() loop) and must survive any input: every
 * length is checked, requests over 1 MiB are refused, and unexpected fds are closed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define DEFAULT_SOCK "/.wisp/run/agent.sock"
#define MAX_REQUEST (1 << 20)
#define MAX_CONNS 1024
#define MAX_GROUPS 1024
#define MAX_FDS 8
#define MAX_JOIN 8
#define TERM_GRACE_MS 2000
#define KILL_GRACE_MS 2000

enum conn_state { C_FREE = 0, C_WAIT_REQUEST, C_RUNNING };

/* Host ends the agent keeps for a process (see "Sessions" above): [0] the stdin write end
 * (TTY: the PTY master), [1] the stdout read end, [2] the stderr read end; -1 = none. */
struct kept {
    int fd[3];
    int tty;
};

struct conn {
    int fd;
    enum conn_state state;
    pid_t pid;
    struct kept keep; /* C_RUNNING: the process's kept host ends */
};

static struct conn conns[MAX_CONNS];

/* A process whose connection closed while it ran (see "Sessions"); pid 0 = free slot. */
#define MAX_ORPHANS MAX_CONNS
#define MAX_EXITED_ORPHANS 64
struct orphan {
    pid_t pid;
    struct kept keep;
    int exited, code;
    long long exited_seq; /* order of exit: the oldest exited record goes first */
};
static struct orphan orphans[MAX_ORPHANS];
static long long orphan_seq;
static char sessions_out[MAX_ORPHANS * 40 + 1];
#define MAX_SERVICES 64
static struct pollfd pfds[MAX_CONNS + 2 + 2 * MAX_SERVICES];
static int pfd_conn[MAX_CONNS + 2 + 2 * MAX_SERVICES];
/* One request buffer: the loop is single-threaded and a request is consumed at once. */
static char reqbuf[MAX_REQUEST + 1];
/* cgroup.procs of the workload cgroups (see "cgroups" above); -1 = unused. */
static int join_fds[MAX_JOIN] = { -1, -1, -1, -1, -1, -1, -1, -1 };

extern char **environ;

static void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    dprintf(2, "wisp-init: ");
    vdprintf(2, fmt, ap);
    dprintf(2, "\n");
    va_end(ap);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Send one packet carrying nfds fds (up to MAX_FDS). Never blocks, never raises SIGPIPE. */
static int send_packet_fds(int sock, const char *data, size_t len, const int *fds, int nfds)
{
    struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } u;
    if (nfds > 0) {
        memset(&u, 0, sizeof(u));
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t)len ? 0 : -1;
}

/* Send one packet, optionally carrying one fd (-1: none). */
static int send_packet(int sock, const char *data, size_t len, int fd)
{
    return send_packet_fds(sock, data, len, &fd, fd >= 0 ? 1 : 0);
}

static void send_text(int sock, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    send_packet(sock, buf, (size_t)n, -1);
}

static void kept_clear(struct kept *k)
{
    k->fd[0] = k->fd[1] = k->fd[2] = -1;
    k->tty = 0;
}

static void kept_close(struct kept *k)
{
    for (int i = 0; i < 3; i++)
        if (k->fd[i] >= 0)
            close(k->fd[i]);
    kept_clear(k);
}

/* Close the connection and everything it keeps (a closed RUNNING connection whose process
 * runs on is made an orphan first, by orphan_from_conn). */
static void close_conn(struct conn *c)
{
    if (c->state != C_FREE) {
        /* Closing with unread packets (a "signal" or "stdin-close" that crossed our "exit")
         * would make the peer's next recv fail with ECONNRESET before it reads "exit". */
        char sink[64];
        while (recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT) > 0)
            ;
        close(c->fd);
        kept_close(&c->keep);
        c->fd = -1;
        c->pid = 0;
        c->state = C_FREE;
    }
}

static void orphan_free(struct orphan *o)
{
    kept_close(&o->keep);
    memset(o, 0, sizeof(*o));
    kept_clear(&o->keep);
}

static struct orphan *orphan_find(pid_t pid)
{
    for (int i = 0; i < MAX_ORPHANS; i++)
        if (orphans[i].pid == pid && pid > 0)
            return &orphans[i];
    return NULL;
}

/* The exited orphan that exited first, or NULL; *count gets how many there are. */
static struct orphan *oldest_exited(int *count)
{
    struct orphan *old = NULL;
    int n = 0;
    for (int i = 0; i < MAX_ORPHANS; i++) {
        if (orphans[i].pid > 0 && orphans[i].exited) {
            n++;
            if (!old || orphans[i].exited_seq < old->exited_seq)
                old = &orphans[i];
        }
    }
    if (count)
        *count = n;
    return old;
}

/* The connection of a running process closed: keep its record and host ends. With every
 * slot taken by running orphans the ends are closed (the process runs on, unadoptable). */
static void orphan_from_conn(struct conn *c)
{
    if (c->state != C_RUNNING || c->pid <= 0)
        return;
    struct orphan *o = orphan_find(c->pid);
    if (o)
        orphan_free(o); /* cannot happen: one record per live pid */
    o = NULL;
    for (int i = 0; i < MAX_ORPHANS && !o; i++)
        if (orphans[i].pid == 0)
            o = &orphans[i];
    if (!o) {
        o = oldest_exited(NULL);
        if (o)
            orphan_free(o);
    }
    if (!o)
        return; /* close_conn closes the ends */
    o->pid = c->pid;
    o->keep = c->keep;
    kept_clear(&c->keep);
    o->exited = 0;
    o->code = -1;
}

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Parse a decimal number in [min, max]; returns 0 on success. */
static int parse_num(const char *s, long long min, long long max, long long *out)
{
    if (*s == '\0')
        return -1;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

struct request {
    const char *path;
    char **argv;
    char **envp;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    int ngroups;
    int tty;
    unsigned short rows, cols;
};

static int parse_groups(const char *s, struct request *r)
{
    r->ngroups = 0;
    if (*s == '\0')
        return 0;
    char tmp[24];
    while (*s) {
        const char *comma = strchr(s, ',');
        size_t len = comma ? (size_t)(comma - s) : strlen(s);
        long long v;
        if (len == 0 || len >= sizeof(tmp) || r->ngroups >= MAX_GROUPS)
            return -1;
        memcpy(tmp, s, len);
        tmp[len] = '\0';
        if (parse_num(tmp, 0, 0xfffffffeLL, &v))
            return -1;
        r->groups[r->ngroups++] = (gid_t)v;
        s += len;
        if (*s == ',')
            s++;
    }
    return 0;
}

/*
 * Parse buf[0..len) into r. argv/envp point into buf and are malloc'ed arrays the caller
 * frees. Returns NULL on success or a static error message.
 */
static const char *parse_request(char *buf, size_t len, struct request *r)
{
    memset(r, 0, sizeof(*r));
    r->rows = 24;
    r->cols = 80;
    r->uid = (uid_t)-1;
    r->gid = (gid_t)-1;
    if (len == 0 || buf[len - 1] != '\0')
        return "request is not NUL-terminated";
    size_t nargs = 0, nenv = 0;
    for (char *p = buf; p < buf + len; p += strlen(p) + 1) {
        if (!strncmp(p, "arg=", 4))
            nargs++;
        else if (!strncmp(p, "env=", 4))
            nenv++;
    }
    if (strcmp(buf, "spawn") != 0)
        return "unknown request";
    if (nargs == 0)
        return "empty argv";
    r->argv = calloc(nargs + 1, sizeof(char *));
    r->envp = calloc(nenv + 1, sizeof(char *));
    if (!r->argv || !r->envp)
        return "out of memory";
    size_t ai = 0, ei = 0;
    int have_uid = 0, have_gid = 0;
    for (char *p = buf + strlen(buf) + 1; p < buf + len; p += strlen(p) + 1) {
        char *eq = strchr(p, '=');
        if (!eq)
            return "malformed field";
        size_t klen = (size_t)(eq - p);
        const char *v = eq + 1;
        long long n;
#define KEY(k) (klen == sizeof(k) - 1 && !strncmp(p, k, klen))
        if (KEY("arg")) {
            r->argv[ai++] = (char *)v;
        } else if (KEY("env")) {
            if (!strchr(v, '='))
                return "malformed env entry";
            r->envp[ei++] = (char *)v;
        } else if (KEY("path")) {
            r->path = v;
        } else if (KEY("cwd")) {
            r->cwd = v;
        } else if (KEY("uid")) {
            if (parse_num(v, 0, 0xfffffffeLL, &n))
                return "bad uid";
            r->uid = (uid_t)n;
            have_uid = 1;
        } else if (KEY("gid")) {
            if (parse_num(v, 0, 0xfffffffeLL, &n))
                return "bad gid";
            r->gid = (gid_t)n;
            have_gid = 1;
        } else if (KEY("groups")) {
            if (parse_groups(v, r))
                return "bad groups";
        } else if (KEY("tty")) {
            if (parse_num(v, 0, 1, &n))
                return "bad tty";
            r->tty = (int)n;
        } else if (KEY("rows")) {
            if (parse_num(v, 1, 65535, &n))
                return "bad rows";
            r->rows = (unsigned short)n;
        } else if (KEY("cols")) {
            if (parse_num(v, 1, 65535, &n))
                return "bad cols";
            r->cols = (unsigned short)n;
        } else {
            return "unknown field";
        }
#undef KEY
    }
    if (!have_uid || !have_gid)
        return "uid and gid are required";
    if (!r->path || !*r->path)
        r->path = r->argv[0];
    if (!*r->path)
        return "empty program name";
    if (!r->cwd || !*r->cwd)
        r->cwd = "/";
    return NULL;
}

/* Move the calling process into every workload cgroup; 0 on success. */
static int join_workload(void)
{
    for (int i = 0; i < MAX_JOIN; i++) {
        if (join_fds[i] < 0)
            continue;
        ssize_t n;
        do {
            n = pwrite(join_fds[i], "0", 1, 0);
        } while (n < 0 && errno == EINTR);
        if (n != 1)
            return -1;
    }
    return 0;
}

static void reset_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Runs in the forked child; never returns. `join`: move into the workload cgroups first
 * (a child of the zygote is there already). */
static void child_exec(struct request *r, int in, int out, int err, int slave, int join)
    __attribute__((noreturn));
static void child_exec(struct request *r, int in, int out, int err, int slave, int join)
{
    reset_signals();
    /* First, so that nothing the command does is charged to the agent's reserve. */
    int join_errno = join && join_workload() < 0 ? errno : 0;
    setsid();
    if (slave >= 0) {
        ioctl(slave, TIOCSCTTY, 0);
        /* The user may reopen its terminal by name (`tty`, ssh, sudo). */
        if (fchown(slave, r->uid, (gid_t)-1) == 0)
            fchmod(slave, 0620);
        in = out = err = slave;
    }
    int src[3] = { in, out, err };
    for (int i = 0; i < 3; i++) {
        if (src[i] == i) {
            fcntl(i, F_SETFD, 0);
        } else if (dup2(src[i], i) < 0) {
            _exit(1);
        }
    }
    if (join_errno) {
        dprintf(2, "wisp: joining the sprite's cgroup: %s\n", strerror(join_errno));
        _exit(1);
    }
    umask(022);
    if (setgroups((size_t)r->ngroups, r->groups) < 0 && r->uid != 0) {
        dprintf(2, "wisp: setgroups: %s\n", strerror(errno));
        _exit(1);
    }
    if (setgid(r->gid) < 0) {
        dprintf(2, "wisp: setgid %u: %s\n", (unsigned)r->gid, strerror(errno));
        _exit(1);
    }
    if (setuid(r->uid) < 0) {
        dprintf(2, "wisp: setuid %u: %s\n", (unsigned)r->uid, strerror(errno));
        _exit(1);
    }
    if (chdir(r->cwd) < 0) {
        dprintf(2, "wisp: cd: %s: %s\n", r->cwd, strerror(errno));
        _exit(1);
    }
    /* execvpe searches the PATH of the current environment: make it the request's. */
    environ = r->envp;
    execvpe(r->path, r->argv, r->envp);
    int e = errno;
    if (e == ENOENT || e == ENOTDIR) {
        if (strchr(r->path, '/'))
            dprintf(2, "wisp: %s: %s\n", r->path, strerror(e));
        else
            dprintf(2, "wisp: %s: command not found\n", r->path);
        _exit(127);
    }
    dprintf(2, "wisp: %s: %s\n", r->path, strerror(e));
    _exit(126);
}

static int open_pty(unsigned short rows, unsigned short cols, int *master_out, int *slave_out)
{
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        return -1;
    int unlock = 0;
    if (ioctl(master, TIOCSPTLCK, &unlock) < 0)
        goto fail;
    struct winsize ws = { .ws_row = rows, .ws_col = cols };
    if (ioctl(master, TIOCSWINSZ, &ws) < 0)
        goto fail;
    int slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (slave < 0) {
        unsigned int n;
        char name[64];
        if (ioctl(master, TIOCGPTN, &n) < 0)
            goto fail;
        snprintf(name, sizeof(name), "/dev/pts/%u", n);
        slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0)
            goto fail;
    }
    *master_out = master;
    *slave_out = slave;
    return 0;
fail:;
    int e = errno;
    close(master);
    errno = e;
    return -1;
}

/*
 * Receive one packet into reqbuf with up to MAX_FDS fds (more are closed). Returns its
 * length (0: the peer closed), or -1 with errno; *flags gets the message flags
 * (MSG_TRUNC/MSG_CTRUNC: too large).
 */
static ssize_t recv_packet(int sock, int recv_flags, int *fds, int *nfds, int *flags)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = { .iov_base = reqbuf, .iov_len = MAX_REQUEST };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf)
    };
    *nfds = 0;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, recv_flags | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR && !(recv_flags & MSG_DONTWAIT));
    if (n < 0)
        return -1;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        size_t cnt = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < cnt; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
            if (*nfds < MAX_FDS)
                fds[(*nfds)++] = fd;
            else
                close(fd);
        }
    }
    *flags = msg.msg_flags;
    return n;
}

/*
 * The zygote (see the top of the file). Protocol on its socket pair, one packet each way:
 * the agent sends the raw spawn request with its fds (three stdio fds, or the PTY slave);
 * the zygote answers with an int: the new process's pid, or -errno when clone failed
 * (EAGAIN: the workload's pids limit is reached). A zygote that does not answer within
 * ZYGOTE_TIMEOUT_MS (stopped from inside the sprite) is killed and replaced.
 */
#define ZYGOTE_TIMEOUT_MS 1000
static pid_t zygote_pid;
static int zygote_sock = -1;

static int have_join_fds(void)
{
    for (int i = 0; i < MAX_JOIN; i++)
        if (join_fds[i] >= 0)
            return 1;
    return 0;
}

static int cmp_int(const void *a, const void *b)
{
    return *(const int *)a - *(const int *)b;
}

/* Close every fd >= 3 but those in keep (the agent's sockets must not live on in it). */
static void close_all_but(int *keep, int n)
{
    qsort(keep, (size_t)n, sizeof(int), cmp_int);
    unsigned int lo = 3;
    for (int i = 0; i < n; i++) {
        if (keep[i] < (int)lo)
            continue;
        if ((unsigned int)keep[i] > lo)
            close_range(lo, (unsigned int)keep[i] - 1, 0);
        lo = (unsigned int)keep[i] + 1;
    }
    close_range(lo, ~0U, 0);
}

static void zygote_main(int sock) __attribute__((noreturn));
static void zygote_main(int sock)
{
    /* Like any process of the workload: `kill -1` from the sprite ends it. */
    reset_signals();
    int keep[1 + MAX_JOIN], n = 0;
    keep[n++] = sock;
    for (int i = 0; i < MAX_JOIN; i++)
        if (join_fds[i] >= 0)
            keep[n++] = join_fds[i];
    close_all_but(keep, n);
    if (join_workload() < 0)
        _exit(1);
    for (int i = 0; i < MAX_JOIN; i++)
        if (join_fds[i] >= 0)
            close(join_fds[i]);
    for (;;) {
        int fds[MAX_FDS], nfds, flags;
        ssize_t len = recv_packet(sock, 0, fds, &nfds, &flags);
        if (len <= 0)
            _exit(0); /* the agent let it go */
        struct request r;
        int answer;
        if (parse_request(reqbuf, (size_t)len, &r) || nfds != (r.tty ? 1 : 3)) {
            answer = -EINVAL; /* the agent checked the same request: cannot happen */
        } else {
            /* The command's parent is the agent: it reaps it and reports its exit. */
            long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, NULL, NULL, 0);
            if (pid == 0) {
                close(sock);
                if (r.tty)
                    child_exec(&r, -1, -1, -1, fds[0], 0);
                child_exec(&r, fds[0], fds[1], fds[2], -1, 0);
            }
            answer = pid < 0 ? -errno : (int)pid;
        }
        free(r.argv);
        free(r.envp);
        close_fds(fds, nfds);
        if (send(sock, &answer, sizeof(answer), MSG_NOSIGNAL) != sizeof(answer))
            _exit(0);
    }
}

static void forget_zygote(int kill_it)
{
    if (kill_it && zygote_pid > 0)
        kill(zygote_pid, SIGKILL);
    if (zygote_sock >= 0)
        close(zygote_sock);
    zygote_sock = -1;
    zygote_pid = 0;
}

static void prepare_zygote(void)
{
    if (zygote_pid > 0 || !have_join_fds())
        return;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        zygote_main(sv[1]);
    }
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        return;
    }
    zygote_pid = pid;
    zygote_sock = sv[0];
}

/* Have the zygote start the request: the new pid, or 0 if the agent must fork itself (no
 * zygote, it is gone or stuck, or its clone failed: a full workload). */
static pid_t zygote_spawn(const char *buf, size_t len, int *fds, int nfds)
{
    if (zygote_pid <= 0)
        return 0;
    if (send_packet_fds(zygote_sock, buf, len, fds, nfds) < 0) {
        forget_zygote(1);
        return 0;
    }
    struct pollfd p = { .fd = zygote_sock, .events = POLLIN };
    int answer = 0;
    int rc;
    do {
        rc = poll(&p, 1, ZYGOTE_TIMEOUT_MS);
    } while (rc < 0 && errno == EINTR);
    if (rc != 1 || recv(zygote_sock, &answer, sizeof(answer), MSG_DONTWAIT) != sizeof(answer)) {
        forget_zygote(1);
        return 0;
    }
    return answer > 0 ? (pid_t)answer : 0;
}

static void handle_request(struct conn *c, char *buf, size_t len, int *fds, int nfds)
{
    struct request r;
    const char *err = parse_request(buf, len, &r);
    if (!err && !r.tty && nfds != 3 && nfds != 5 && nfds != 6)
        err = "non-TTY spawn needs 3, 5 or 6 fds";
    if (!err && r.tty && nfds != 0)
        err = "TTY spawn takes no fds";
    if (err) {
        send_text(c->fd, "error %s", err);
        close_fds(fds, nfds);
        free(r.argv);
        free(r.envp);
        close_conn(c);
        return;
    }
    int master = -1, slave = -1;
    if (r.tty && open_pty(r.rows, r.cols, &master, &slave) < 0) {
        send_text(c->fd, "error pty: %s", strerror(errno));
        free(r.argv);
        free(r.envp);
        close_conn(c);
        return;
    }
    /* Host ends to keep (fds 3.. of a non-TTY spawn): 6 = stdin, stdout, stderr; 5 = no
     * stdin pipe. */
    struct kept keep;
    kept_clear(&keep);
    keep.tty = r.tty;
    if (nfds == 6) {
        keep.fd[0] = fds[3];
        keep.fd[1] = fds[4];
        keep.fd[2] = fds[5];
    } else if (nfds == 5) {
        keep.fd[1] = fds[3];
        keep.fd[2] = fds[4];
    }
    int fork_errno = 0;
    pid_t pid = r.tty ? zygote_spawn(buf, len, &slave, 1) : zygote_spawn(buf, len, fds, 3);
    if (pid == 0) {
        pid = fork();
        if (pid == 0) {
            if (r.tty)
                child_exec(&r, -1, -1, -1, slave, 1);
            child_exec(&r, fds[0], fds[1], fds[2], -1, 1);
        }
        fork_errno = errno;
    }
    free(r.argv);
    free(r.envp);
    close_fds(fds, nfds < 3 ? nfds : 3); /* the child's ends; the host ends are in keep */
    if (slave >= 0)
        close(slave);
    keep.fd[0] = r.tty ? master : keep.fd[0];
    if (pid < 0) {
        send_text(c->fd, "error fork: %s", strerror(fork_errno));
        kept_close(&keep);
        close_conn(c);
        return;
    }
    /* A pid is unique among records: an exited orphan whose pid came round again is gone. */
    struct orphan *stale = orphan_find(pid);
    if (stale)
        orphan_free(stale);
    char msg[32];
    int n = snprintf(msg, sizeof(msg), "pid %d", (int)pid);
    c->pid = pid;
    c->state = C_RUNNING;
    c->keep = keep;
    if (send_packet(c->fd, msg, (size_t)n, master) < 0) {
        /* The server is gone already: the process runs on, detached and adoptable. */
        orphan_from_conn(c);
        close_conn(c);
    }
    prepare_zygote(); /* if there was none: the next spawn has one */
}

static void signal_group(pid_t pid, int sig)
{
    if (kill(-pid, sig) < 0 && errno == ESRCH)
        kill(pid, sig);
}

static void handle_running(struct conn *c, char *buf, size_t len)
{
    if (len == sizeof("stdin-close") - 1 && !memcmp(buf, "stdin-close", len)) {
        /* The server closed its stdin end: drop ours so that the process sees EOF. */
        if (!c->keep.tty && c->keep.fd[0] >= 0) {
            close(c->keep.fd[0]);
            c->keep.fd[0] = -1;
        }
        return;
    }
    if (len > 7 && len <= 32 && !memcmp(buf, "resize ", 7)) {
        /* The window size, set on the PTY master the agent keeps: the host end may be a
         * relay's socket rather than the master itself (a VM sprite). */
        char tmp[33];
        memcpy(tmp, buf + 7, len - 7);
        tmp[len - 7] = '\0';
        char *sp = strchr(tmp, ' ');
        long long rows, cols;
        if (!sp || !c->keep.tty || c->keep.fd[0] < 0)
            return;
        *sp = '\0';
        if (parse_num(tmp, 1, 65535, &rows) == 0 && parse_num(sp + 1, 1, 65535, &cols) == 0) {
            struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
            ioctl(c->keep.fd[0], TIOCSWINSZ, &ws);
        }
        return;
    }
    if (len < 8 || len > 32 || memcmp(buf, "signal ", 7) != 0)
        return;
    char tmp[33];
    memcpy(tmp, buf + 7, len - 7);
    tmp[len - 7] = '\0';
    long long sig;
    if (parse_num(tmp, 1, NSIG - 1, &sig) == 0)
        signal_group(c->pid, (int)sig);
}

/* ---- Services (see the top of the file) ------------------------------------------------ */

#define SVC_NAME_MAX 63
#define SVC_BACKOFF_MIN_MS 250
#define SVC_BACKOFF_MAX_MS 30000
#define SVC_STABLE_MS 10000
#define SVC_READ_CHUNK 65536
/* Every definition lives in the agent's memory (its reserve): 64 x 128 KiB at most. */
#define SVC_SPEC_MAX (128 * 1024)

enum svc_status { S_STOPPED = 0, S_STARTING, S_RUNNING, S_STOPPING, S_FAILED };
static const char *const svc_status_names[] = { "stopped", "starting", "running", "stopping",
                                                "failed" };

struct service {
    int used;
    char name[SVC_NAME_MAX + 1];
    char *spec; /* a "spawn" request, validated by parse_request */
    size_t spec_len;
    char logdir[256];
    long long logmax;
    enum svc_status status;
    int want;          /* restart it whenever it exits */
    int start_after;   /* start again once the current process is gone (restart, upsert) */
    int forget;        /* drop it once the current process is gone (delete) */
    pid_t pid;
    long long started_wall, started_ms;
    int restart_count, failures, last_exit;
    long long restart_at_ms, restart_at_wall, kill_at_ms;
    char error[128];
    int out[2];        /* read ends of stdout, stderr; -1 closed */
    int logfd[3];      /* combined, stdout, stderr; -1 not open */
    long long logsize[3];
};

static struct service services[MAX_SERVICES];
static char svc_out[MAX_SERVICES * 400 + 1];

static long long wall_s(void)
{
    return (long long)time(NULL);
}

static struct service *svc_find(const char *name)
{
    for (int i = 0; i < MAX_SERVICES; i++)
        if (services[i].used && !strcmp(services[i].name, name))
            return &services[i];
    return NULL;
}

/* Names are [A-Za-z0-9_ -], 1-63 bytes, not starting with a space: safe as a file name and
 * in the tab-separated list. */
static int svc_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > SVC_NAME_MAX || s[0] == ' ')
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == ' '))
            return 0;
    }
    return 1;
}

static const char *const log_suffix[3] = { ".log", ".stdout.log", ".stderr.log" };

static void svc_log_path(struct service *s, int k, char *buf, size_t len, int rotated)
{
    snprintf(buf, len, "%s/%s%s%s", s->logdir, s->name, log_suffix[k], rotated ? ".1" : "");
}

static int svc_open_log(struct service *s, int k)
{
    char path[PATH_MAX];
    svc_log_path(s, k, path, sizeof(path), 0);
    int flags = O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK;
    int fd = open(path, flags, 0644);
    if (fd < 0 && errno == ENOENT && mkdir(s->logdir, 0755) == 0)
        fd = open(path, flags, 0644);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    s->logfd[k] = fd;
    s->logsize[k] = st.st_size;
    return 0;
}

static void svc_close_logs(struct service *s)
{
    for (int k = 0; k < 3; k++) {
        if (s->logfd[k] >= 0)
            close(s->logfd[k]);
        s->logfd[k] = -1;
    }
}

/* Append to log k; a file that reaches logmax is renamed to FILE.1 and a new one started,
 * so no file passes logmax (a write is split at the boundary). */
static void svc_log_write(struct service *s, int k, const char *data, size_t n)
{
    for (int rotations = 0; n > 0; ) {
        if (s->logfd[k] >= 0 && s->logsize[k] >= s->logmax) {
            char path[PATH_MAX], old[PATH_MAX];
            svc_log_path(s, k, path, sizeof(path), 0);
            svc_log_path(s, k, old, sizeof(old), 1);
            /* bounded: the sprite's root may keep putting big files there */
            if (++rotations > 4)
                return;
            if (rename(path, old) == 0) {
                close(s->logfd[k]);
                s->logfd[k] = -1;
            } else if (ftruncate(s->logfd[k], 0) == 0) {
                s->logsize[k] = 0;
            } else {
                return;
            }
        }
        if (s->logfd[k] < 0 && svc_open_log(s, k) < 0)
            return;
        if (s->logsize[k] >= s->logmax)
            continue; /* an existing file already past the cap: rotate it first */
        size_t room = (size_t)(s->logmax - s->logsize[k]);
        size_t part = n < room ? n : room;
        ssize_t w = write(s->logfd[k], data, part);
        if (w <= 0)
            return;
        s->logsize[k] += w;
        data += w;
        n -= (size_t)w;
    }
}

static void svc_close_pipe(struct service *s, int i)
{
    if (s->out[i] >= 0)
        close(s->out[i]);
    s->out[i] = -1;
}

/* Read what one of the service's pipes holds into its logs; EOF closes the pipe. */
static void svc_drain(struct service *s, int i)
{
    static char chunk[SVC_READ_CHUNK];
    for (int rounds = 0; rounds < 16 && s->out[i] >= 0; rounds++) {
        ssize_t n = read(s->out[i], chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            svc_close_pipe(s, i);
            return;
        }
        svc_log_write(s, 0, chunk, (size_t)n);
        svc_log_write(s, 1 + i, chunk, (size_t)n);
    }
}

static void svc_free(struct service *s)
{
    svc_close_pipe(s, 0);
    svc_close_pipe(s, 1);
    svc_close_logs(s);
    free(s->spec);
    memset(s, 0, sizeof(*s));
}

/* A crash (or a spawn that failed): wait, then start again. */
static void svc_schedule_restart(struct service *s)
{
    if (now_ms() - s->started_ms >= SVC_STABLE_MS)
        s->failures = 0;
    /* the first crash after a stable run restarts at once, then 250 ms, 500 ms, ... */
    long long delay = s->failures ? SVC_BACKOFF_MIN_MS : 0;
    for (int i = 1; i < s->failures && delay < SVC_BACKOFF_MAX_MS; i++)
        delay *= 2;
    if (delay > SVC_BACKOFF_MAX_MS)
        delay = SVC_BACKOFF_MAX_MS;
    s->failures++;
    s->restart_count++;
    s->restart_at_ms = now_ms() + delay;
    s->restart_at_wall = wall_s() + (delay + 999) / 1000;
    s->status = S_STARTING;
}

static void svc_spawn(struct service *s)
{
    s->restart_at_ms = 0;
    s->restart_at_wall = 0;
    /* Output of the previous run still held by a leftover child: keep what is there. */
    for (int i = 0; i < 2; i++) {
        svc_drain(s, i);
        svc_close_pipe(s, i);
    }
    for (int k = 0; k < 3; k++)
        if (s->logfd[k] < 0)
            svc_open_log(s, k);
    struct request r;
    const char *err = parse_request(s->spec, s->spec_len, &r);
    int fds[3] = { -1, -1, -1 }, pout[2] = { -1, -1 }, perr[2] = { -1, -1 };
    pid_t pid = -1;
    if (!err) {
        fds[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fds[0] < 0 || pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0) {
            err = "pipe";
        } else {
            fds[1] = pout[1];
            fds[2] = perr[1];
            pid = zygote_spawn(s->spec, s->spec_len, fds, 3);
            if (pid == 0) {
                pid = fork();
                if (pid == 0)
                    child_exec(&r, fds[0], fds[1], fds[2], -1, 1);
                if (pid < 0)
                    err = "fork";
            }
        }
    }
    int e = errno;
    free(r.argv);
    free(r.envp);
    close_fds(fds, 3);
    s->started_ms = now_ms();
    s->started_wall = wall_s();
    if (err || pid <= 0) {
        if (pout[0] >= 0)
            close(pout[0]);
        if (perr[0] >= 0)
            close(perr[0]);
        snprintf(s->error, sizeof(s->error), "cannot start: %s: %s", err ? err : "spawn",
                 strerror(e));
        s->pid = 0;
        svc_schedule_restart(s);
        prepare_zygote();
        return;
    }
    fcntl(pout[0], F_SETFL, O_NONBLOCK);
    fcntl(perr[0], F_SETFL, O_NONBLOCK);
    s->out[0] = pout[0];
    s->out[1] = perr[0];
    s->pid = pid;
    s->status = S_RUNNING;
    s->error[0] = '\0';
    prepare_zygote();
}

/* Ask the current process to end: SIGTERM now, SIGKILL after timeout_ms. */
static void svc_terminate(struct service *s, long long timeout_ms)
{
    s->restart_at_ms = 0;
    s->restart_at_wall = 0;
    if (s->pid > 0) {
        signal_group(s->pid, SIGTERM);
        s->status = S_STOPPING;
        s->kill_at_ms = now_ms() + timeout_ms;
    } else {
        s->status = S_STOPPED;
    }
}

/* The service's process exited with code: what comes next. */
static void svc_exited(struct service *s, int code)
{
    s->pid = 0;
    s->last_exit = code;
    s->kill_at_ms = 0;
    if (s->forget) {
        for (int i = 0; i < 2; i++)
            svc_drain(s, i);
        svc_free(s);
    } else if (s->start_after) {
        s->start_after = 0;
        s->want = 1;
        svc_spawn(s);
    } else if (s->want) {
        snprintf(s->error, sizeof(s->error), "exited with code %d", code);
        svc_schedule_restart(s);
    } else {
        s->status = S_STOPPED;
    }
}

/* Timers: restarts that are due, SIGKILLs that are due. Returns ms until the next one
 * (-1: none). */
static int svc_tick(void)
{
    long long now = now_ms(), next = -1;
    for (int i = 0; i < MAX_SERVICES; i++) {
        struct service *s = &services[i];
        if (!s->used)
            continue;
        if (s->restart_at_ms && s->pid <= 0 && s->want) {
            if (now >= s->restart_at_ms)
                svc_spawn(s);
            else if (next < 0 || s->restart_at_ms < next)
                next = s->restart_at_ms;
        }
        if (s->kill_at_ms && s->pid > 0) {
            if (now >= s->kill_at_ms) {
                signal_group(s->pid, SIGKILL);
                s->kill_at_ms = 0;
            } else if (next < 0 || s->kill_at_ms < next) {
                next = s->kill_at_ms;
            }
        }
    }
    if (next < 0)
        return -1;
    long long left = next - now_ms();
    return left < 0 ? 0 : (left > INT_MAX ? INT_MAX : (int)left);
}

/* Field "key=" of a request (fields from p to end), or NULL. */
static const char *svc_field(char *p, char *end, const char *key)
{
    size_t kl = strlen(key);
    for (; p < end; p += strlen(p) + 1) {
        if (!strcmp(p, "spawn"))
            return NULL; /* the embedded spawn request starts: no more service fields */
        if (!strncmp(p, key, kl) && p[kl] == '=')
            return p + kl + 1;
    }
    return NULL;
}

static const char *svc_define(char *buf, size_t len)
{
    char *end = buf + len, *first = buf + strlen(buf) + 1;
    const char *name = svc_field(first, end, "name");
    const char *start = svc_field(first, end, "start");
    const char *logdir = svc_field(first, end, "logdir");
    const char *logmax = svc_field(first, end, "logmax");
    long long want, max;
    if (!name || !svc_name_ok(name))
        return "bad service name";
    if (!start || parse_num(start, 0, 1, &want))
        return "bad start";
    if (!logdir || logdir[0] != '/' || strlen(logdir) >= sizeof(services[0].logdir))
        return "bad logdir";
    if (!logmax || parse_num(logmax, 4096, 1LL << 40, &max))
        return "bad logmax";
    char *spec = NULL;
    for (char *p = first; p < end; p += strlen(p) + 1) {
        if (!strcmp(p, "spawn")) {
            spec = p;
            break;
        }
    }
    if (!spec)
        return "no spawn request";
    size_t spec_len = (size_t)(end - spec);
    if (spec_len > SVC_SPEC_MAX)
        return "definition too large";
    struct request r;
    const char *err = parse_request(spec, spec_len, &r);
    int tty = r.tty;
    free(r.argv);
    free(r.envp);
    if (err)
        return err;
    if (tty)
        return "a service has no terminal";
    char *copy = malloc(spec_len);
    if (!copy)
        return "out of memory";
    memcpy(copy, spec, spec_len);
    struct service *s = svc_find(name);
    if (!s) {
        for (int i = 0; i < MAX_SERVICES && !s; i++)
            if (!services[i].used)
                s = &services[i];
        if (!s) {
            free(copy);
            return "too many services";
        }
        memset(s, 0, sizeof(*s));
        s->used = 1;
        snprintf(s->name, sizeof(s->name), "%s", name);
        s->out[0] = s->out[1] = -1;
        s->logfd[0] = s->logfd[1] = s->logfd[2] = -1;
        s->last_exit = -1;
    }
    free(s->spec);
    s->spec = copy;
    s->spec_len = spec_len;
    if (strcmp(s->logdir, logdir)) {
        svc_close_logs(s);
        snprintf(s->logdir, sizeof(s->logdir), "%s", logdir);
    }
    s->logmax = max;
    s->forget = 0;
    if (want) {
        s->restart_count = 0;
        s->failures = 0;
        if (s->pid > 0) { /* runs the old definition: replace it */
            s->start_after = 1;
            svc_terminate(s, 10000);
        } else {
            s->want = 1;
            svc_spawn(s);
        }
    }
    return NULL;
}

static void svc_list(int fd)
{
    size_t off = 0;
    svc_out[0] = '\0';
    for (int i = 0; i < MAX_SERVICES; i++) {
        struct service *s = &services[i];
        if (!s->used)
            continue;
        int n = snprintf(svc_out + off, sizeof(svc_out) - off,
                         "%s\t%s\t%d\t%lld\t%d\t%lld\t%d\t%s\n", s->name,
                         svc_status_names[s->status], s->pid > 0 ? (int)s->pid : 0,
                         s->pid > 0 || s->status != S_STOPPED ? s->started_wall : 0,
                         s->restart_count, s->restart_at_ms ? s->restart_at_wall : 0,
                         s->last_exit, s->error);
        if (n < 0 || (size_t)n >= sizeof(svc_out) - off)
            break;
        off += (size_t)n;
    }
    send_packet(fd, off ? svc_out : "\n", off ? off : 1, -1);
}

/* One svc-* request: answer and close the connection. */
static void handle_service_request(struct conn *c, char *buf, size_t len)
{
    const char *err = NULL;
    if (len == 0 || buf[len - 1] != '\0') {
        err = "request is not NUL-terminated";
    } else if (!strcmp(buf, "svc-list")) {
        svc_list(c->fd);
        close_conn(c);
        return;
    } else if (!strcmp(buf, "svc-define")) {
        err = svc_define(buf, len);
    } else if (!strcmp(buf, "svc-quiesce")) {
        /* The sprite is going down: what exits now stays down (nothing is recorded). */
        for (int i = 0; i < MAX_SERVICES; i++) {
            services[i].want = services[i].start_after = 0;
            services[i].restart_at_ms = 0;
            if (services[i].used && services[i].pid <= 0)
                services[i].status = S_STOPPED;
        }
    } else {
        char *end = buf + len, *first = buf + strlen(buf) + 1;
        const char *name = svc_field(first, end, "name");
        struct service *s = name ? svc_find(name) : NULL;
        long long v = 0;
        if (!s) {
            err = "no such service";
        } else if (!strcmp(buf, "svc-start")) {
            s->forget = 0;
            s->restart_count = 0;
            s->failures = 0;
            if (s->pid > 0 && s->status == S_STOPPING) {
                s->start_after = 1;
            } else if (s->pid <= 0) {
                s->want = 1;
                svc_spawn(s);
            } else {
                s->want = 1;
            }
        } else if (!strcmp(buf, "svc-stop") || !strcmp(buf, "svc-delete")) {
            const char *t = svc_field(first, end, "timeout");
            if (!t || parse_num(t, 0, 86400000LL, &v)) {
                err = "bad timeout";
            } else {
                s->want = 0;
                s->start_after = 0;
                if (!strcmp(buf, "svc-delete"))
                    s->forget = 1;
                svc_terminate(s, v);
                if (s->forget && s->pid <= 0)
                    svc_free(s);
            }
        } else if (!strcmp(buf, "svc-signal")) {
            const char *sig = svc_field(first, end, "sig");
            if (!sig || parse_num(sig, 1, NSIG - 1, &v))
                err = "bad signal";
            else if (s->pid <= 0)
                err = "not running";
            else
                signal_group(s->pid, (int)v);
        } else {
            err = "unknown request";
        }
    }
    if (err)
        send_text(c->fd, "error %s", err);
    else
        send_text(c->fd, "ok");
    close_conn(c);
}

_Static_assert(MAX_FDS <= MAX_JOIN, "a message carries at most MAX_JOIN cgroup fds");

/* Replace the workload cgroup fds; takes ownership of fds (they are O_CLOEXEC). */
static void set_join_fds(int *fds, int nfds)
{
    for (int i = 0; i < MAX_JOIN; i++) {
        if (join_fds[i] >= 0)
            close(join_fds[i]);
        join_fds[i] = i < nfds ? fds[i] : -1;
    }
}

/* "sessions": one line per orphan, "PID\tSTATE\tCODE\n" (STATE running or exited; CODE -1
 * while it runs); "\n" when there is none. The connection is closed. */
static void list_orphans(struct conn *c)
{
    size_t off = 0;
    for (int i = 0; i < MAX_ORPHANS; i++) {
        struct orphan *o = &orphans[i];
        if (o->pid <= 0)
            continue;
        int n = snprintf(sessions_out + off, sizeof(sessions_out) - off, "%d\t%s\t%d\n",
                         (int)o->pid, o->exited ? "exited" : "running",
                         o->exited ? o->code : -1);
        if (n < 0 || (size_t)n >= sizeof(sessions_out) - off)
            break;
        off += (size_t)n;
    }
    send_packet(c->fd, off ? sessions_out : "\n", off ? off : 1, -1);
    close_conn(c);
}

/* "adopt" "pid=N": bind this connection to orphan N. Answer "pid N" with its kept host ends
 * (1 fd: the PTY master; 2: stdout, stderr; 3: stdin, stdout, stderr), as a spawn does;
 * then "exit N", at once if it has exited (the record is freed: the server has the ends). */
static void handle_adopt(struct conn *c, char *buf, size_t len)
{
    const char *err = NULL;
    long long v = 0;
    struct orphan *o = NULL;
    char *pid_field = buf + sizeof("adopt");
    size_t rest = len - sizeof("adopt");
    if (buf[len - 1] != '\0' || rest < sizeof("pid=0") || strlen(pid_field) != rest - 1
        || strncmp(pid_field, "pid=", 4) || parse_num(pid_field + 4, 1, INT_MAX, &v)) {
        err = "bad adopt request";
    } else if (!(o = orphan_find((pid_t)v))) {
        int bound = 0;
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].state == C_RUNNING && conns[i].pid == (pid_t)v)
                bound = 1;
        err = bound ? "process is attached" : "no such process";
    }
    if (err) {
        send_text(c->fd, "error %s", err);
        close_conn(c);
        return;
    }
    int fds[3], nfds = 0;
    for (int i = 0; i < 3; i++)
        if (o->keep.fd[i] >= 0)
            fds[nfds++] = o->keep.fd[i];
    char msg[32];
    int n = snprintf(msg, sizeof(msg), "pid %d", (int)o->pid);
    if (send_packet_fds(c->fd, msg, (size_t)n, fds, nfds) < 0) {
        close_conn(c); /* the orphan stays as it was */
        return;
    }
    if (o->exited) {
        send_text(c->fd, "exit %d", o->code);
        orphan_free(o);
        close_conn(c);
        return;
    }
    c->state = C_RUNNING;
    c->pid = o->pid;
    c->keep = o->keep;
    kept_clear(&o->keep);
    orphan_free(o);
}

static void handle_conn(struct conn *c)
{
    if (c->state == C_FREE)
        return;
    int fds[MAX_FDS], nfds, flags;
    ssize_t n = recv_packet(c->fd, MSG_DONTWAIT, fds, &nfds, &flags);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        orphan_from_conn(c);
        close_conn(c);
        return;
    }
    if (n == 0) {
        /* Peer closed: a running process carries on, detached, kept as an orphan. */
        close_fds(fds, nfds);
        orphan_from_conn(c);
        close_conn(c);
        return;
    }
    if (c->state == C_RUNNING) {
        close_fds(fds, nfds);
        handle_running(c, reqbuf, (size_t)n);
        return;
    }
    if (flags & (MSG_TRUNC | MSG_CTRUNC)) {
        send_text(c->fd, "error request too large");
        close_fds(fds, nfds);
        close_conn(c);
        return;
    }
    if ((size_t)n == sizeof("cgroups") && !memcmp(reqbuf, "cgroups", sizeof("cgroups"))) {
        forget_zygote(1); /* it joined the old cgroups */
        set_join_fds(fds, nfds);
        send_text(c->fd, "ok");
        close_conn(c);
        prepare_zygote();
        return;
    }
    if (n > 4 && !memcmp(reqbuf, "svc-", 4)) {
        close_fds(fds, nfds);
        handle_service_request(c, reqbuf, (size_t)n);
        return;
    }
    if ((size_t)n == sizeof("sessions") && !memcmp(reqbuf, "sessions", sizeof("sessions"))) {
        close_fds(fds, nfds);
        list_orphans(c);
        return;
    }
    if ((size_t)n >= sizeof("adopt") && !memcmp(reqbuf, "adopt", sizeof("adopt"))) {
        close_fds(fds, nfds);
        handle_adopt(c, reqbuf, (size_t)n);
        return;
    }
    handle_request(c, reqbuf, (size_t)n, fds, nfds);
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return;
        }
        struct conn *slot = NULL;
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].state == C_FREE) {
                slot = &conns[i];
                break;
            }
        }
        if (!slot) {
            send_text(fd, "error too many connections");
            close(fd);
            continue;
        }
        slot->fd = fd;
        slot->state = C_WAIT_REQUEST;
        slot->pid = 0;
        kept_clear(&slot->keep);
    }
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == zygote_pid) { /* killed (kill -1 in the sprite): made again at a spawn */
            forget_zygote(0);
            continue;
        }
        int code;
        if (WIFEXITED(status))
            code = WEXITSTATUS(status);
        else if (WIFSIGNALED(status))
            code = 128 + WTERMSIG(status);
        else
            continue;
        int found = 0;
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].state == C_RUNNING && conns[i].pid == pid) {
                send_text(conns[i].fd, "exit %d", code);
                close_conn(&conns[i]);
                found = 1;
                break;
            }
        }
        struct orphan *o = found ? NULL : orphan_find(pid);
        if (o && !o->exited) {
            /* Kept (with its host ends: unread output) until adopted or pushed out. */
            o->exited = 1;
            o->code = code;
            o->exited_seq = ++orphan_seq;
            int count;
            struct orphan *old = oldest_exited(&count);
            if (count > MAX_EXITED_ORPHANS && old)
                orphan_free(old);
        }
        for (int i = 0; i < MAX_SERVICES; i++) {
            if (services[i].used && services[i].pid == pid) {
                svc_exited(&services[i], code);
                break;
            }
        }
    }
}

static int have_children(void)
{
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    return waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) == 0;
}

/* kill(-1) from a namespace's PID 1 reaches every process but itself; anywhere else
 * (tests running the agent directly) it would reach the whole host, so only signal ours. */
static void signal_everyone(int sig)
{
    if (getpid() == 1) {
        kill(-1, sig);
        return;
    }
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].state == C_RUNNING)
            signal_group(conns[i].pid, sig);
    for (int i = 0; i < MAX_ORPHANS; i++)
        if (orphans[i].pid > 0 && !orphans[i].exited)
            signal_group(orphans[i].pid, sig);
    for (int i = 0; i < MAX_SERVICES; i++)
        if (services[i].used && services[i].pid > 0)
            signal_group(services[i].pid, sig);
}

static int listen_on(const char *path)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(addr.sun_path)) {
        logmsg("socket path too long: %s", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        logmsg("socket: %s", strerror(errno));
        return -1;
    }
    unlink(path);
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof(addr));
    umask(old);
    if (rc < 0 || chmod(path, 0600) < 0 || listen(fd, 128) < 0) {
        logmsg("listen on %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void ensure_std_fds(void)
{
    for (int i = 0; i < 3; i++) {
        if (fcntl(i, F_GETFD) < 0) {
            int fd = open("/dev/null", O_RDWR);
            if (fd >= 0 && fd != i) {
                dup2(fd, i);
                close(fd);
            }
        }
    }
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : DEFAULT_SOCK;
    /* Keep 0-2 taken so that fds received from the server never land on them. */
    ensure_std_fds();
    if (getpid() != 1)
        prctl(PR_SET_CHILD_SUBREAPER, 1);

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        logmsg("signalfd: %s", strerror(errno));
        return 1;
    }
    int lfd = listen_on(path);
    if (lfd < 0)
        return 1;

    int shutting = 0, killed = 0;
    long long deadline = 0;
    for (;;) {
        int np = 0;
        pfds[np] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        pfd_conn[np++] = -1;
        if (lfd >= 0) {
            pfds[np] = (struct pollfd){ .fd = lfd, .events = POLLIN };
            pfd_conn[np++] = -2;
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].state != C_FREE) {
                pfds[np] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN };
                pfd_conn[np++] = i;
            }
        }
        for (int i = 0; i < MAX_SERVICES; i++) {
            for (int j = 0; j < 2; j++) {
                if (services[i].used && services[i].out[j] >= 0) {
                    pfds[np] = (struct pollfd){ .fd = services[i].out[j], .events = POLLIN };
                    pfd_conn[np++] = MAX_CONNS + 2 * i + j;
                }
            }
        }
        int timeout = shutting ? -1 : svc_tick();
        if (shutting) {
            long long left = deadline - now_ms();
            timeout = left < 0 ? 0 : (int)left;
        }
        int rc = poll(pfds, (nfds_t)np, timeout);
        if (rc < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            return 1;
        }
        for (int k = 0; rc > 0 && k < np; k++) {
            if (!pfds[k].revents)
                continue;
            if (pfd_conn[k] == -1) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
                    if ((si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) && !shutting) {
                        shutting = 1;
                        deadline = now_ms() + TERM_GRACE_MS;
                        for (int i = 0; i < MAX_SERVICES; i++)
                            services[i].want = services[i].start_after = 0;
                        signal_everyone(SIGTERM);
                        close(lfd);
                        lfd = -1;
                    }
                }
                reap();
            } else if (pfd_conn[k] == -2) {
                accept_all(lfd);
            } else if (pfd_conn[k] >= MAX_CONNS) {
                int i = (pfd_conn[k] - MAX_CONNS) / 2;
                if (services[i].used)
                    svc_drain(&services[i], (pfd_conn[k] - MAX_CONNS) % 2);
            } else {
                handle_conn(&conns[pfd_conn[k]]);
            }
        }
        if (shutting) {
            reap();
            if (!have_children())
                return 0;
            if (now_ms() >= deadline) {
                if (killed)
                    return 0;
                signal_everyone(SIGKILL);
                killed = 1;
                deadline = now_ms() + KILL_GRACE_MS;
            }
        }
    }
}
