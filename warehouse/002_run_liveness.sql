-- Run liveness: who runs a job, and when it last showed a sign of life.
--
-- A run is 'running' only while its process lives. A later command recognises a dead one
-- (same host and pid gone, or no heartbeat for long) and marks it 'died'
-- (factory.runs.reap_dead_runs). Status: running | succeeded | stopped | failed |
-- interrupted | died.
alter table job_runs add column host varchar;          -- hostname of the process
alter table job_runs add column pid integer;           -- its process id
alter table job_runs add column pid_started double;    -- its start time (guards against pid reuse)
alter table job_runs add column heartbeat_at timestamp;   -- last flush / sign of life
