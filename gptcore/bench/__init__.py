"""`gptcore bench`: maintainer tooling that measures speed and memory beside the peers (Hugging Face,
llama.cpp), the roofs of this machine, and the load other processes put on it. Nothing else imports it."""
