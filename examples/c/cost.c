/*
 * What libtether costs a process: threads, and resident memory for idle connected clients.
 *
 *   cost HOST:PORT [N]     (N clients, default 100; the server must let N connections in)
 *
 * Prints the process's threads and RSS before the first client, with one idle client connected, and with N;
 * each step waits until every client has said CONNECTED, then for three heartbeats (500 ms) to pass.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tether.h"

/* A line of /proc/self/status, e.g. "VmRSS:" (kB) or "Threads:". */
static long status_field(const char *name) {
    char line[256];
    long value = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, name, strlen(name)) == 0) value = atol(line + strlen(name));
    fclose(f);
    return value;
}

static void report(const char *what, int clients) {
    printf("%-28s clients %5d  threads %3ld  rss %7ld kB\n", what, clients, status_field("Threads:"),
           status_field("VmRSS:"));
}

static tether_client *start(const char *server, int i) {
    tether_config *cfg;
    tether_client *c;
    tether_event ev;
    char id[32];
    snprintf(id, sizeof id, "cost-%d", i);
    if (tether_config_new(id, &cfg) || tether_config_add_server(cfg, server) ||
        tether_config_set_heartbeat(cfg, 500) || tether_client_start(cfg, &c)) {
        fprintf(stderr, "start: %s\n", tether_last_error());
        exit(1);
    }
    tether_config_free(cfg);
    do {
        if (tether_next_event(c, 10000, &ev) != TETHER_OK) {
            fprintf(stderr, "client %d did not connect\n", i);
            exit(1);
        }
    } while (ev.kind != TETHER_EVENT_CONNECTED);
    return c;
}

static void idle(void) {
    struct timespec t = {1, 500000000}; /* three heartbeats: let the first exchanges settle */
    nanosleep(&t, NULL);
}

int main(int argc, char **argv) {
    int n = argc > 2 ? atoi(argv[2]) : 100, i;
    tether_client **clients;
    if (argc < 2 || n < 1) {
        fprintf(stderr, "usage: %s HOST:PORT [N]\n", argv[0]);
        return 2;
    }
    clients = calloc((size_t)n, sizeof *clients);
    report("library loaded", 0);
    clients[0] = start(argv[1], 0);
    idle();
    report("one idle client", 1);
    for (i = 1; i < n; i++) clients[i] = start(argv[1], i);
    idle();
    report("idle clients", n);
    for (i = 0; i < n; i++) {
        tether_close(clients[i], 2000);
        tether_free(clients[i]);
    }
    free(clients);
    return 0;
}
