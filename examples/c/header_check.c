/* tether.h compiles as strict C89 (and, with g++, as C++): scripts/test-clients checks both. */
#include "tether.h"

int main(void) {
    tether_event ev;
    ev.kind = TETHER_EVENT_DATA;
    return tether_status_text(TETHER_OK) != 0 && ev.kind == TETHER_EVENT_DATA ? 0 : 1;
}
