-- Argo CD health of a Lockstep ConsistencyGroup (argocd-cm key resource.customizations.health.lockstep.dev_ConsistencyGroup):
-- Replicating with Ready=True is Healthy; Freezing and Resyncing are Progressing; Frozen (writes held until
-- spec.release) and Running (released, unreplicated until spec.resync) wait for a person: Suspended;
-- Degraded, or Replicating with Ready=False, is Degraded. Until the operator observed the current
-- generation, Progressing.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Lockstep operator to observe the group"
  return hs
end
local ready = nil
for _, condition in ipairs(status.conditions or {}) do
  if condition.type == "Ready" then
    ready = condition
  end
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration ~= generation
    or (ready ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration ~= generation)) then
  hs.status = "Progressing"
  hs.message = "The Lockstep operator has not observed generation " .. generation .. " yet"
  return hs
end
local phase = status.phase
hs.message = phase .. " at epoch " .. (status.epoch or 0)
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = hs.message .. ": " .. ready.message
end
if phase == "Replicating" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
elseif phase == "Freezing" or phase == "Resyncing" then
  hs.status = "Progressing"
elseif phase == "Frozen" or phase == "Running" then
  hs.status = "Suspended"
elseif phase == "Replicating" or phase == "Degraded" then
  hs.status = "Degraded"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
