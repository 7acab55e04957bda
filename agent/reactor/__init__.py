"""The ``dbagent agent`` daemon: it consumes the event stream, keeps the durable audit trail (audit) and
reacts to failures with an automatic rollback or an escalation (daemon)."""
