"""The rules, over plain values: what is on the NAS (``snapshot``), what is a leftover
(``findings``), what may be deleted (``safety``), host and local paths (``paths``), and the
read side the API and the CLI share (``inventory``)."""
