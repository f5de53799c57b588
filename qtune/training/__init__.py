"""Training glue: the trainers' wiring, callbacks, several processes and their launch."""
