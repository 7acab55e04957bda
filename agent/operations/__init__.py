"""What a worker does with a command: the lifecycle (decode → authorise → lock → call → emit → finish) and
one plain function per verb over a context (``Run``) that a test can build without a worker."""
