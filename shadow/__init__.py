"""Device shadows: desired / reported / delta documents with CAS and version vectors."""
