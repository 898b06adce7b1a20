/*
 * The libtether scenario in C (see scripts/test-clients): alice and bob, each with a primary and a backup
 * server, see each other, talk, survive the primary's SIGSTOP by failing over, and close cleanly.
 * Exits 0 when every step held; otherwise prints the step that failed and exits 1.
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "tether.h"

static const char *primary, *backup;

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "c scenario FAILED: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void check(int32_t rc, const char *what) {
    if (rc != TETHER_OK) fail("%s: %s (%s)", what, tether_status_text(rc), tether_last_error());
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static tether_client *start(const char *id) {
    tether_config *cfg = NULL;
    tether_client *client = NULL;
    check(tether_config_new(id, &cfg), "tether_config_new");
    check(tether_config_add_server(cfg, primary), "add primary");
    check(tether_config_add_server(cfg, backup), "add backup");
    check(tether_config_set_heartbeat(cfg, 500), "set heartbeat");
    /* Reconnect after 100 ms at first; stay on the backup once there. */
    check(tether_config_set_reconnect(cfg, 100, 2000, 0, 0), "set reconnect");
    check(tether_client_start(cfg, &client), "tether_client_start");
    tether_config_free(cfg);
    return client;
}

/* Pull `who`'s events until one of `kind` matches (peer and data, when given), within `ms`. */
static void wait_for(tether_client *c, const char *who, int32_t kind, const char *peer, const char *data,
                     int32_t state, long long ms, tether_event *ev) {
    long long deadline = now_ms() + ms;
    for (;;) {
        long long left = deadline - now_ms();
        int32_t rc;
        if (left <= 0) fail("%s: no event of kind %d (peer %s) within %lld ms", who, kind, peer ? peer : "-", ms);
        rc = tether_next_event(c, (int32_t)left, ev);
        if (rc == TETHER_TIMEOUT) continue;
        check(rc, "tether_next_event");
        if (ev->kind == TETHER_EVENT_DISCONNECTED)
            printf("%s: disconnected from %s: %s (by server: %d)\n", who, ev->server, ev->reason, ev->flag);
        if (ev->kind == TETHER_EVENT_CONNECTED) printf("%s: connected to %s\n", who, ev->server);
        if (ev->kind != kind) continue;
        if (peer && strcmp(ev->peer, peer) != 0) continue;
        if (state && ev->state != state) continue;
        if (data && (ev->len != strlen(data) || memcmp(ev->data, data, ev->len) != 0)) continue;
        return;
    }
}

static void send_text(tether_client *c, const char *to, const char *text) {
    check(tether_send(c, to, (const uint8_t *)text, strlen(text), NULL), "tether_send");
}

static void talk(tether_client *alice, tether_client *bob, const char *round) {
    tether_event ev;
    char a[64], b[64];
    snprintf(a, sizeof a, "hello bob (%s)", round);
    snprintf(b, sizeof b, "hello alice (%s)", round);
    send_text(alice, "bob", a);
    wait_for(bob, "bob", TETHER_EVENT_DATA, "alice", a, 0, 5000, &ev);
    send_text(bob, "alice", b);
    wait_for(alice, "alice", TETHER_EVENT_DATA, "bob", b, 0, 5000, &ev);
    printf("exchanged messages (%s)\n", round);
}

static void close_client(tether_client *c, const char *who) {
    tether_event ev;
    int32_t rc;
    int saw_bye = 0;
    check(tether_close(c, 3000), "tether_close");
    if (tether_close(c, 3000) != TETHER_ERR_CLOSED) fail("%s: a second close was not refused", who);
    if (tether_send(c, "x", (const uint8_t *)"x", 1, NULL) != TETHER_ERR_CLOSED) fail("%s: send after close", who);
    while ((rc = tether_next_event(c, 3000, &ev)) == TETHER_OK)
        if (ev.kind == TETHER_EVENT_DISCONNECTED && strcmp(ev.reason, "bye") == 0) saw_bye = 1;
    if (rc != TETHER_CLOSED) fail("%s: events did not end with TETHER_CLOSED: %s", who, tether_status_text(rc));
    if (!saw_bye) fail("%s: no disconnected(bye) after close", who);
    tether_free(c);
}

int main(void) {
    tether_client *alice, *bob;
    tether_event ev;
    const char *pid_s = getenv("TETHER_PRIMARY_PID");
    long long stopped_at, bound;
    uint32_t timeout_ms;

    primary = getenv("TETHER_PRIMARY");
    backup = getenv("TETHER_BACKUP");
    if (!primary || !backup || !pid_s) fail("TETHER_PRIMARY, TETHER_BACKUP and TETHER_PRIMARY_PID must be set");

    /* 1. Connect to the primary, with a backup configured. */
    alice = start("alice");
    bob = start("bob");
    wait_for(alice, "alice", TETHER_EVENT_CONNECTED, NULL, NULL, 0, 5000, &ev);
    if (strcmp(ev.server, primary) != 0 || ev.flag != 1) fail("alice connected to %s, not the primary", ev.server);
    timeout_ms = ev.timeout_ms;
    wait_for(bob, "bob", TETHER_EVENT_CONNECTED, NULL, NULL, 0, 5000, &ev);

    /* 2. Subscribe to the peer and see it online. */
    check(tether_subscribe(alice, "bob"), "tether_subscribe");
    wait_for(alice, "alice", TETHER_EVENT_PRESENCE, "bob", NULL, TETHER_ONLINE, 5000, &ev);
    printf("alice sees bob online\n");

    /* 3. Exchange messages. */
    talk(alice, bob, "primary");

    /* 4. Stop the primary: the death is the client's heartbeat verdict, and both move to the backup. */
    if (kill((pid_t)atol(pid_s), SIGSTOP) != 0) fail("SIGSTOP the primary");
    stopped_at = now_ms();
    bound = timeout_ms + 2000;
    wait_for(alice, "alice", TETHER_EVENT_DISCONNECTED, NULL, NULL, 0, bound, &ev);
    if (strcmp(ev.reason, "heartbeat_timeout") != 0 || ev.flag != 0 || strcmp(ev.server, primary) != 0)
        fail("alice: disconnected with %s (by server: %d) from %s", ev.reason, ev.flag, ev.server);
    wait_for(alice, "alice", TETHER_EVENT_CONNECTED, NULL, NULL, 0, bound - (now_ms() - stopped_at), &ev);
    if (strcmp(ev.server, backup) != 0 || ev.flag != 0) fail("alice reconnected to %s, not the backup", ev.server);
    printf("alice failed over to the backup %lld ms after the SIGSTOP (bound %lld ms)\n", now_ms() - stopped_at,
           bound);
    wait_for(alice, "alice", TETHER_EVENT_PRESENCE, "bob", NULL, TETHER_ONLINE, 5000, &ev);
    printf("alice sees bob online on the backup\n");
    talk(alice, bob, "backup");

    /* 5. Close cleanly. */
    close_client(alice, "alice");
    close_client(bob, "bob");
    printf("c scenario passed\n");
    return 0;
}
