-- Orthanc auto-routing to dipnode: every stable PET or MR series is forwarded.
-- Orthanc calls OnStableSeries once no instance has arrived for "StableAge" seconds.
-- The MR may come from another study of the same patient: dipnode matches by Patient ID.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'PT' or modality == 'MR' then
    -- A series that dipnode itself produced comes back tagged by its Series Description
    -- prefix ([output] description_prefix, default "dipnode"); never route it again (no loop).
    local description = tags['SeriesDescription'] or ''
    if string.find(description, '^dipnode') == nil then
      print('routing series ' .. seriesId .. ' (' .. modality .. ') to dipnode')
      SendToModality(seriesId, 'dipnode')
    end
  end
end
