-- Orthanc auto-routing to dipnode: every stable PET or MR series is forwarded.
-- Orthanc calls OnStableSeries once no instance of a series has arrived for "StableAge"
-- seconds. The MR may come from another study of the same patient: dipnode matches by
-- Patient ID, and can also fetch an older MR from Orthanc itself ([[sources]] in its settings).
--
-- Why not SendToModality(seriesId, 'dipnode'): that Lua function sends ONE INSTANCE and fails
-- on a series ID ("Unable to read attachment dicom of instance <series id>"). The REST route
-- /modalities/<name>/store sends every instance of a series. "Asynchronous": the transfer runs
-- as an Orthanc job (listed at /jobs; POST /jobs/<id>/resubmit sends it again) instead of
-- holding Orthanc's single Lua thread, which runs every other callback, for the whole transfer.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'PT' or modality == 'MR' then
    -- A series that dipnode itself produced comes back tagged by its Series Description
    -- prefix ([output] description_prefix, default "dipnode"); never route it again (no loop).
    local description = tags['SeriesDescription'] or ''
    if string.find(description, '^dipnode') == nil then
      print('routing series ' .. seriesId .. ' (' .. modality .. ') to dipnode')
      RestApiPost('/modalities/dipnode/store',
                  DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
    end
  end
end
