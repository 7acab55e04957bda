"""The front ends: the ``dbagent`` command line, the HTTP API for deploy systems and the Slack endpoint. They
submit through ``dbagent.bus.producer`` and render; nothing else in dbagent imports them."""
