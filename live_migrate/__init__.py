"""Live migration of a running guest's memory: the pre-copy engine, its wire protocol,
its transports and its guest backends. Imports nothing else of p2v's."""
