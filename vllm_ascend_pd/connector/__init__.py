"""AscendSimpleConnector: the vLLM V1 KV connector (facade, scheduler, worker)."""
