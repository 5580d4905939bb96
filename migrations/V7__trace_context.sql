-- Ward schema, version 7: the W3C trace context of each instance (the
-- `traceparent` of the request that started it, or a new trace), carried
-- to every task message's headers and to the HTTP calls of its steps.
ALTER TABLE instances ADD COLUMN trace_parent text;
