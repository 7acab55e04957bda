"""``dbagent demo``: embedded PostgreSQL and Redis (servers, shared with the tests) and the walkthrough."""
