"""Redis: the queues (one per database), the producer every front end submits through, the event stream and
its consumer groups; every Redis name is in ``keys``."""
