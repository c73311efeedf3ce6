"""`tune run recipes/<name>.py` entry points. A package so that it shadows torchtune's own
`recipes` (see README, "How tune run finds our recipes")."""
