-- Argo CD health of a Lockstep ReplicationNode (argocd-cm key resource.customizations.health.lockstep.dev_ReplicationNode),
-- written by the node's sidecar: Degraded when held writes failed at a hold timeout (HoldTimedOut) or its
-- fail-safe suspended a group (Ready=False, FailSafe); Progressing until the replicator's volumes are
-- known, or while its conditions name an older generation than the object's; Healthy when Ready.
local hs = {}
local status = obj.status
local ready = nil
local held = nil
for _, condition in ipairs((status and status.conditions) or {}) do
  if condition.type == "Ready" then
    ready = condition
  elseif condition.type == "HoldTimedOut" then
    held = condition
  end
end
local generation = obj.metadata.generation
if held ~= nil and held.status == "True" then
  hs.status = "Degraded"
  hs.message = held.message
elseif ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the node's Lockstep sidecar"
elseif generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "The node's Lockstep sidecar has not observed generation " .. generation .. " yet"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
elseif ready.reason == "FailSafe" then
  hs.status = "Degraded"
  hs.message = ready.message
else
  hs.status = "Progressing"
  hs.message = ready.message
end
return hs
