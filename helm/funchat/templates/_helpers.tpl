{{/* Chart name. */}}
{{- define "funchat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every object. */}}
{{- define "funchat.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels; dict "ctx" . "component" name. */}}
{{- define "funchat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "funchat.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels; dict "ctx" . "component" name. */}}
{{- define "funchat.labels" -}}
{{ include "funchat.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: funchat
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Object name of a model service (audio_tokenizer -> <fullname>-audio-tokenizer). */}}
{{- define "funchat.modelServiceName" -}}
{{- printf "%s-%s" (include "funchat.fullname" .ctx) (.name | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A model service's settings: modelServiceDefaults merged with modelServices.<name>; dict "ctx" . "name" name. */}}
{{- define "funchat.modelServiceValues" -}}
{{- $own := index .ctx.Values.modelServices .name | default dict -}}
{{- include "funchat.deepMerge" (dict "dst" .ctx.Values.modelServiceDefaults "src" $own) -}}
{{- end -}}

{{/* YAML of dst with src merged in (maps recursively; any other src value, even "", 0, false
or [], replaces dst's: unlike mergeOverwrite, which skips empty values). */}}
{{- define "funchat.deepMerge" -}}
{{- $dst := deepCopy .dst -}}
{{- range $k, $v := .src -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) -}}
{{- $_ := set $dst $k (include "funchat.deepMerge" (dict "dst" (index $dst $k) "src" $v) | fromYaml) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $dst -}}
{{- end -}}

{{/* image: dict with repository, tag, pullPolicy; "ctx" for the default tag. */}}
{{- define "funchat.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Restricted container securityContext. */}}
{{- define "funchat.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod securityContext. */}}
{{- define "funchat.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Names of the secrets. */}}
{{- define "funchat.resumeSecretName" -}}
{{- default (printf "%s-resume" (include "funchat.fullname" .)) .Values.secrets.resume.existingSecret -}}
{{- end -}}
{{/* The operator's Secret holding the API key file (auth.mode api_keys); never created by the chart. */}}
{{- define "funchat.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "funchat.fullname" .)) .Values.auth.apiKeysSecret.name -}}
{{- end -}}
{{/* Where the orchestrator containers mount that Secret: a directory, so that the kubelet's updates
reach the file (a subPath mount would keep the first version). */}}
{{- define "funchat.apiKeysMountPath" -}}
/etc/funchat/api-keys
{{- end -}}
{{/* The orchestrator's largest gRPC message (FUNCHAT_MAX_MESSAGE_BYTES; the settings' default). */}}
{{- define "funchat.maxMessageBytes" -}}
{{- int64 (default 16777216 .Values.orchestrator.settings.max_message_bytes) -}}
{{- end -}}
{{/* A FUNCHAT_* setting's value as a string: a whole number without the exponent that a float64
(every number in values) gets from toString past 6 digits (16777216 -> "1.6777216e+07"). */}}
{{- define "funchat.settingValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . | toString -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
{{- define "funchat.redisSecretName" -}}
{{- default (printf "%s-redis" (include "funchat.fullname" .)) .Values.redis.internal.existingSecret -}}
{{- end -}}
{{- define "funchat.checkpointClaimName" -}}
{{- if eq .Values.modelStorage.mode "existingClaim" -}}
{{- .Values.modelStorage.existingClaim.claimName -}}
{{- else -}}
{{- default (printf "%s-checkpoint-cache" (include "funchat.fullname" .)) .Values.modelStorage.download.claimName -}}
{{- end -}}
{{- end -}}

{{/* The Redis password as env var .name (REDIS_PASSWORD in the Redis container,
FUNCHAT_REDIS_PASSWORD in the orchestrator's), if there is a password; dict "ctx" . "name" NAME.
A variable of its own rather than $(VAR) inside a URL or an argument: the kubelet expands those,
other runners of the same manifests (podman kube play) do not. */}}
{{- define "funchat.redisPasswordEnv" -}}
{{- $r := .ctx.Values.redis -}}
{{- if eq $r.mode "internal" }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "funchat.redisSecretName" .ctx }}
      key: {{ $r.internal.passwordKey }}
{{- else if $r.external.existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $r.external.existingSecret }}
      key: {{ $r.external.passwordKey }}
{{- end }}
{{- end -}}

{{/* FUNCHAT_TRACING_* env (funchat/tracing.py) of the orchestrator and model-service containers,
or nothing while tracing.endpoint is "". The headers may hold a vendor's API key: they come from
tracing.headersSecret through a secretKeyRef, never as a value. */}}
{{- define "funchat.tracingEnv" -}}
{{- $t := .Values.tracing -}}
{{- if and $t.headersSecret.name (not $t.endpoint) -}}
{{- fail "tracing.headersSecret.name is set but tracing.endpoint is empty: the headers go with the exports to the collector; set tracing.endpoint (host:port, http://host:port or https://host:port) or leave tracing.headersSecret.name empty" -}}
{{- end -}}
{{- if $t.endpoint -}}
- name: FUNCHAT_TRACING_ENDPOINT
  value: {{ $t.endpoint | quote }}
- name: FUNCHAT_TRACING_SAMPLE_RATIO
  value: {{ $t.sampleRatio | toString | quote }}
{{- with $t.headersSecret.name }}
- name: FUNCHAT_TRACING_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $t.headersSecret.key }}
      optional: false
{{- end }}
{{- end -}}
{{- end -}}

{{/* "true" when the in-chart Redis serves TLS (redis.internal.tls.secretName). */}}
{{- define "funchat.redisTls" -}}
{{- if and (eq .Values.redis.mode "internal") .Values.redis.internal.tls.secretName -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/* The Secret holding the CA that verifies Redis' certificate ("" when none): the in-chart Redis'
TLS Secret, or redis.external.caSecret for an external rediss:// Redis. */}}
{{- define "funchat.redisCaSecret" -}}
{{- if eq (include "funchat.redisTls" .) "true" -}}
{{- .Values.redis.internal.tls.secretName -}}
{{- else if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret -}}
{{- if not (hasPrefix "rediss://" .Values.redis.external.url) -}}
{{- fail "redis.external.caSecret is set but redis.external.url is not rediss://: a CA only verifies a TLS connection; use rediss:// or drop caSecret" -}}
{{- end -}}
{{- .Values.redis.external.caSecret -}}
{{- end -}}
{{- end -}}

{{/* The key of the CA in that Secret. */}}
{{- define "funchat.redisCaKey" -}}
{{- if eq (include "funchat.redisTls" .) "true" -}}ca.crt{{- else -}}{{ .Values.redis.external.caKey }}{{- end -}}
{{- end -}}

{{/* FUNCHAT_REDIS_URL, without the password (FUNCHAT_REDIS_PASSWORD carries it). */}}
{{- define "funchat.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- $address := default (printf "%s-redis:6379" (include "funchat.fullname" .)) .Values.orchestrator.addresses.redis -}}
{{- printf "%s://%s/0" (ternary "rediss" "redis" (include "funchat.redisTls" . | eq "true")) $address -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* FUNCHAT_ENDPOINTS JSON: each model service's Triton gRPC address, unless
orchestrator.addresses names another. Deployments: the model service's Service, port 8001. KServe:
the InferenceService's predictor Service, <isvc>-predictor (KServe's PredictorServiceName), port
80: in RawDeployment KServe gives the runtime container's first port (h2c, Triton's gRPC) Service
port 80; in Serverless Knative's route serves h2c on port 80. The namespace is in the name because
Knative's cluster-local gateway routes <name>.<namespace>[.svc[.<cluster domain>]] hosts, not a
bare name. */}}
{{- define "funchat.endpoints" -}}
{{- $out := dict -}}
{{- range $name := list "audio_tokenizer" "llm" "refined_head" "vocoder" -}}
{{- $service := include "funchat.modelServiceName" (dict "ctx" $ "name" $name) -}}
{{- $derived := printf "%s:8001" $service -}}
{{- if $.Values.kserve.enabled -}}
{{- $derived = printf "%s-predictor.%s.svc:80" $service $.Release.Namespace -}}
{{- end -}}
{{- $_ := set $out $name (default $derived (index $.Values.orchestrator.addresses $name)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A model service's container resources; dict "v" settings "gpus" bool: with its nvidia.com/gpu
requests and limits (when v.gpus > 0). */}}
{{- define "funchat.modelResources" -}}
{{- $res := deepCopy .v.resources -}}
{{- if and .gpus (gt (int .v.gpus) 0) -}}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .v.gpus)) ($res.requests | default dict)) -}}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .v.gpus)) ($res.limits | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Checkpoint volume (read-only in the main containers). */}}
{{- define "funchat.checkpointVolume" -}}
- name: checkpoint
  persistentVolumeClaim:
    claimName: {{ include "funchat.checkpointClaimName" . }}
    readOnly: {{ eq .Values.modelStorage.mode "existingClaim" }}
{{- if eq .Values.modelStorage.mode "download" }}
- name: fetch
  configMap:
    name: {{ include "funchat.fullname" . }}-fetch
    defaultMode: 0555
{{- end }}
{{- end -}}

{{- define "funchat.checkpointMount" -}}
- name: checkpoint
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
  {{- with .Values.modelStorage.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end -}}

{{/* Init container fetching the checkpoint (mode download). */}}
{{- define "funchat.fetchInitContainer" -}}
{{- if eq .Values.modelStorage.mode "download" }}
{{- $d := .Values.modelStorage.download }}
- name: fetch-checkpoint
  image: {{ printf "%s:%s" $d.image.repository $d.image.tag }}
  imagePullPolicy: {{ $d.image.pullPolicy }}
  command: [/bin/sh, /etc/funchat/fetch/fetch_checkpoint.sh, /cache, /etc/funchat/fetch/manifest]
  securityContext:
    {{- include "funchat.containerSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  volumeMounts:
    - name: checkpoint
      mountPath: /cache
      {{- with .Values.modelStorage.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: fetch
      mountPath: /etc/funchat/fetch
      readOnly: true
{{- end }}
{{- end -}}

{{/* FUNCHAT_PARAMS of the image's entrypoint: "KEY=VALUE ..." (shell-quoted) from a parameters map. */}}
{{- define "funchat.paramsEnv" -}}
{{- $items := list -}}
{{- range $k, $v := . -}}
{{- $items = append $items (printf "%s=%s" $k (squote $v)) -}}
{{- end -}}
{{- join " " $items -}}
{{- end -}}

{{/* Container fields of a KServe predictor (kserve-container): image, probes, resources, mounts;
dict "ctx" . "v" settings "gpus" bool. The ServingRuntime has them from modelServiceDefaults
(without GPUs: KServe merges resource maps, so a GPU there could not be taken away from a CPU-only
service), each InferenceService from its own settings, which win. */}}
{{- define "funchat.kserveContainer" -}}
{{- $v := .v -}}
image: {{ include "funchat.image" (dict "ctx" .ctx "image" $v.image) }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if eq .ctx.Values.kserve.deploymentMode "Serverless" }}
# Knative probes only the serving port and has no gRPC probes: TCP on Triton's gRPC port, which
# tritonserver opens once the model is loaded
readinessProbe:
  tcpSocket:
    port: 8001
  periodSeconds: {{ int $v.probes.readiness.periodSeconds }}
  failureThreshold: {{ int $v.probes.readiness.failureThreshold }}
{{- else }}
startupProbe:
  httpGet:
    path: /v2/health/ready
    port: http
  periodSeconds: {{ int $v.probes.startup.periodSeconds }}
  failureThreshold: {{ int $v.probes.startup.failureThreshold }}
readinessProbe:
  httpGet:
    path: /v2/health/ready
    port: http
  periodSeconds: {{ int $v.probes.readiness.periodSeconds }}
  failureThreshold: {{ int $v.probes.readiness.failureThreshold }}
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: http
  periodSeconds: {{ int $v.probes.liveness.periodSeconds }}
  failureThreshold: {{ int $v.probes.liveness.failureThreshold }}
{{- end }}
resources:
  {{- include "funchat.modelResources" (dict "v" $v "gpus" .gpus) | nindent 2 }}
volumeMounts:
  - name: shm
    mountPath: /dev/shm
  - name: tmp
    mountPath: /tmp
{{- end -}}

{{/* /dev/shm and /tmp emptyDirs of a KServe predictor; the settings. */}}
{{- define "funchat.kserveVolumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
{{- end -}}
