/*
 * A console chat between two ids over tether, with presence:
 *
 *   chat alice bob 127.0.0.1:7400 [backup:port ...]
 *
 * Each line typed is sent to the peer; what the peer says, whether it is online, and the state of the link are
 * printed as they happen. Events are pulled on a thread of this program's own; the main thread reads stdin.
 * Build: gcc -I crates/tether-ffi chat.c -L target/debug -ltether -lpthread
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "tether.h"

static void *print_events(void *arg) {
    tether_client *client = arg;
    tether_event ev;
    int32_t rc;
    while ((rc = tether_next_event(client, -1, &ev)) == TETHER_OK) {
        switch (ev.kind) {
        case TETHER_EVENT_CONNECTED: printf("* connected to %s\n", ev.server); break;
        case TETHER_EVENT_DISCONNECTED: printf("* disconnected from %s: %s\n", ev.server, ev.reason); break;
        case TETHER_EVENT_CONNECT_FAILED: printf("* could not connect to %s: %s (retrying)\n", ev.server, ev.text); break;
        case TETHER_EVENT_GAVE_UP: printf("* gave up reconnecting: %s\n", ev.reason); break;
        case TETHER_EVENT_PRESENCE:
            printf("* %s is %s%s%s\n", ev.peer,
                   ev.state == TETHER_ONLINE ? "online" : ev.state == TETHER_SUSPECT ? "suspect" : "offline",
                   *ev.reason ? ": " : "", ev.reason);
            break;
        case TETHER_EVENT_DATA: printf("%s> %.*s\n", ev.peer, (int)ev.len, (const char *)ev.data); break;
        case TETHER_EVENT_UNDELIVERABLE: printf("* not delivered to %s: %s\n", ev.peer, ev.reason); break;
        default: break;
        }
        fflush(stdout);
    }
    return NULL;
}

int main(int argc, char **argv) {
    tether_config *cfg;
    tether_client *client;
    pthread_t events;
    char line[4096];
    int i;
    if (argc < 4) {
        fprintf(stderr, "usage: %s ME PEER HOST:PORT [BACKUP:PORT ...]\n", argv[0]);
        return 2;
    }
    if (tether_config_new(argv[1], &cfg) != TETHER_OK) {
        fprintf(stderr, "%s\n", tether_last_error());
        return 2;
    }
    for (i = 3; i < argc; i++) {
        if (tether_config_add_server(cfg, argv[i]) != TETHER_OK) {
            fprintf(stderr, "%s\n", tether_last_error());
            return 2;
        }
    }
    if (tether_client_start(cfg, &client) != TETHER_OK) {
        fprintf(stderr, "%s\n", tether_last_error());
        return 1;
    }
    tether_config_free(cfg);
    tether_subscribe(client, argv[2]);
    pthread_create(&events, NULL, print_events, client);
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strcspn(line, "\n");
        if (tether_send(client, argv[2], (const uint8_t *)line, n, NULL) != TETHER_OK)
            printf("* not sent: %s\n", tether_last_error());
    }
    tether_close(client, 2000); /* the event thread sees TETHER_CLOSED and ends */
    pthread_join(events, NULL);
    tether_free(client);
    return 0;
}
